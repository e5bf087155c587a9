// `npm run soak`: the long crash loop. At least 20 SIGKILLs of a relayq child process under
// continuous load from several clients, then a full drain; prints one summary line and exits
// non-zero if anything acknowledged is missing, stuck in 'sending' or undelivered.
// Options (env): SOAK_KILLS (default 25), SOAK_CLIENTS (6), SOAK_SEED (random), SOAK_SPOOL_AFTER
// (bytes: the relay's spoolAfter, with message bodies four times as large, so that every message
// is spooled while the relay is killed; default: small messages).
import { runCrashLoop, summaryLine } from '../reliability/crash-loop.js';

const kills = Number(process.env.SOAK_KILLS ?? 25);
const clients = Number(process.env.SOAK_CLIENTS ?? 6);
const seed = Number(process.env.SOAK_SEED ?? Math.floor(Math.random() * 2 ** 31));
const spoolAfter = process.env.SOAK_SPOOL_AFTER ? Number(process.env.SOAK_SPOOL_AFTER) : undefined;

const result = await runCrashLoop({
  kills,
  clients,
  uptimeMs: [300, 3000],
  processingTimeoutS: 5,
  drainTimeoutMs: 120_000,
  seed,
  spoolAfter,
  progress: (line) => process.stderr.write(`soak: ${line}\n`),
});

const ok =
  result.kills >= kills &&
  result.acknowledged > 0 &&
  result.missing.length === 0 &&
  result.notStored.length === 0 &&
  result.stuckSending === 0 &&
  result.undelivered === 0 &&
  result.finalExitCode === 0 &&
  result.spoolFilesLeft === 0;
process.stdout.write(`soak ${ok ? 'PASS' : 'FAIL'}: ${summaryLine(result)}\n`);
if (!ok) {
  if (result.missing.length) process.stdout.write(`missing: ${result.missing.join(' ')}\n`);
  if (result.notStored.length) process.stdout.write(`not stored: ${result.notStored.join(' ')}\n`);
}
process.exit(ok ? 0 : 1);
