// A Treadle remote worker in Node.js (>= 18: global fetch), no npm dependencies.
//
// It leases jobs of one remote stage from `treadle serve` (docs/remote-workers.md), runs
// `handle(input, config, job)` on each, and reports the output, or the error it threw.
// A heartbeat keeps the lease while the function runs.
//
//   TREADLE_URL=http://127.0.0.1:8233 TREADLE_TOKEN=... STAGE_ID=shout node worker.mjs
//
// Environment: TREADLE_URL (default http://127.0.0.1:8233), TREADLE_TOKEN (a token with
// the `worker` scope; empty for an open server), STAGE_ID (default `shout`), WORKER_ID
// (default node-<pid>), MAX_JOBS (exit after that many; default: run until SIGTERM),
// DELAY_MS (sleep before answering: lets a test kill the worker mid-stage).

const base = (process.env.TREADLE_URL ?? "http://127.0.0.1:8233").replace(/\/$/, "");
const token = process.env.TREADLE_TOKEN ?? "";
const stageId = process.env.STAGE_ID ?? "shout";
const workerId = process.env.WORKER_ID ?? `node-${process.pid}`;
const maxJobs = process.env.MAX_JOBS ? Number(process.env.MAX_JOBS) : Infinity;
const delayMs = Number(process.env.DELAY_MS ?? 0);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// The stage body: its input and output follow the stage's JSON Schemas
// (GET /api/v1/workers/stages). Throw to fail the attempt; set `retryable = false`
// on the error to fail the stage for good.
async function handle(input, config, job) {
  if (delayMs) await sleep(delayMs);
  if (!Array.isArray(input?.words)) {
    const error = new TypeError("input.words must be a list");
    error.retryable = false;
    throw error;
  }
  const words = input.words.map((w) => w.toUpperCase() + (config?.suffix ?? "!"));
  return { words, lang: input.lang ?? "en" };
}

async function call(path, body) {
  const response = await fetch(`${base}/api/v1/workers/${encodeURIComponent(workerId)}/${path}`, {
    method: "POST",
    headers: { "content-type": "application/json", ...(token && { authorization: `Bearer ${token}` }) },
    body: JSON.stringify(body),
  });
  const text = await response.text();
  if (!response.ok) throw new Error(`${path} answered ${response.status}: ${text}`);
  return JSON.parse(text);
}

async function runJob(job) {
  const lease = { job_id: job.job_id, lease_token: job.lease_token };
  const beat = setInterval(() => {
    call("heartbeat", lease).catch((err) => console.error(`heartbeat failed: ${err.message}`));
  }, job.heartbeat_interval * 1000);
  let outcome;
  try {
    const output = await handle(job.input, job.config, job);
    outcome = await call("complete", { ...lease, output });
  } catch (err) {
    outcome = await call("fail", {
      ...lease,
      error: String(err?.message ?? err),
      error_type: err?.name ?? "Error",
      retryable: err?.retryable !== false,
    });
  } finally {
    clearInterval(beat);
  }
  const how = outcome.ghost ? "discarded (ghost)" : outcome.outcome;
  console.log(`job ${job.job_id} attempt ${job.attempt}: ${how}`);
}

let stopping = false;
process.on("SIGTERM", () => { stopping = true; });
process.on("SIGINT", () => { stopping = true; });

let done = 0;
console.log(`worker ${workerId} serving stage ${stageId} at ${base}`);
while (!stopping && done < maxJobs) {
  let jobs;
  try {
    ({ jobs } = await call("lease", { stage_ids: [stageId], wait: 5, max_jobs: 1 }));
  } catch (err) {
    console.error(`lease failed: ${err.message}`);
    if (/answered 4\d\d/.test(err.message)) process.exit(2);
    await sleep(1000);
    continue;
  }
  for (const job of jobs) {
    await runJob(job);
    done += 1;
  }
}
await call("leave", {}).catch(() => {});
