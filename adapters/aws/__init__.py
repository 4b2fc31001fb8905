"""AWS adapters. Nothing here imports boto3: callers pass a client they built
(``boto3.client("sqs")``, from the optional ``aws`` extra) or any object with the
same methods, so tests and non-AWS installs need no AWS library."""

from treadle.adapters.aws.s3 import S3BlobStore, S3Client
from treadle.adapters.aws.sqs import SqsClient, SqsWakeups

__all__ = ["S3BlobStore", "S3Client", "SqsClient", "SqsWakeups"]
