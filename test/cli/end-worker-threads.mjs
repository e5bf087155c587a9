// Loaded into a relay process with `node --import` by tests: SIGUSR2 ends every worker thread the
// process made, as an out-of-memory abort or a crash in native code would end one, so that a test
// can watch what `relayq serve` does when its writer thread dies.
import { syncBuiltinESMExports } from 'node:module';
import workerThreads from 'node:worker_threads';

if (workerThreads.isMainThread) {
  const made = new Set();
  const Original = workerThreads.Worker;
  workerThreads.Worker = class extends Original {
    constructor(...args) {
      super(...args);
      made.add(this);
    }
  };
  syncBuiltinESMExports();
  process.on('SIGUSR2', () => {
    for (const worker of made) worker.terminate();
  });
}
