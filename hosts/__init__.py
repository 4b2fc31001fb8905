"""Hosts run the kernel: worker, serverless, AWS Lambda, cron tick, CLI. Nothing imports hosts."""

__all__: list[str] = []
