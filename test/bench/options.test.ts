// `npm run bench` takes only the flags the README lists: a typo must stop it at once, not start
// the full ten-minute run, and a value that is not a whole number must not become NaN (which ran
// no repeat at all and printed "-" for every figure).
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { parseOptions, UsageError } from './run.js';

const RUN_TS = path.join(path.dirname(fileURLToPath(import.meta.url)), 'run.ts');

describe('bench options', () => {
  test('defaults, --quick and explicit values', () => {
    const full = parseOptions([]);
    assert.equal(full.quick, false);
    assert.deepEqual([...full.sections], ['fsync', 'intake', 'memory', 'sustained', 'scale']);
    assert.deepEqual([full.runMs, full.repeats, full.warmUpMs, full.scaleMessages], [2000, 3, 5000, 1_000_000]);
    assert.deepEqual([full.sustainedWorkers, full.sustainedUnpaced], [[16, 128], [16]]);
    const quick = parseOptions(['--quick', '--only', 'intake,fsync']);
    assert.deepEqual([quick.runMs, quick.repeats, quick.warmUpMs, quick.scaleMessages], [1000, 1, 1000, 100_000]);
    assert.deepEqual([...quick.sections], ['intake', 'fsync']);
    const set = parseOptions(['--only=wal', '--warm-up-ms', '0', '--memory-bytes=5242880', '--sustained-workers', '5,64', '--sustained-unpaced', '', '--relay', 'spoolAfter=0,workerCount=4', '--cpu-prof']);
    assert.deepEqual([...set.sections], ['wal']);
    assert.equal(set.warmUpMs, 0);
    assert.equal(set.memoryBytes, 5_242_880);
    assert.deepEqual([set.sustainedWorkers, set.sustainedUnpaced], [[5, 64], []]);
    assert.deepEqual(set.relayConfig, { spoolAfter: '0', workerCount: '4' });
    assert.equal(set.cpuProf, true);
  });

  test('a mistake is refused, naming the flag or value', () => {
    const refused: Array<[string[], RegExp]> = [
      [['--quik'], /Unknown option '--quik'/],
      [['--only'], /'--only <value>' argument missing/],
      [['--only', 'intake,nope'], /unknown section "nope"; known: fsync, intake, memory, sustained, scale, wal/],
      [['--repeats', 'abc'], /--repeats takes an integer of at least 1, not "abc"/],
      [['--run-ms', '0'], /--run-ms takes an integer of at least 1, not "0"/],
      [['--memory-bytes', '5MB'], /--memory-bytes takes an integer of at least 1, not "5MB"/],
      [['--warm-up-ms', '-1'], /--warm-up-ms/],
      [['--sustained-workers', '16;128'], /--sustained-workers takes an integer of at least 1, not "16;128"/],
      [['--relay', 'spoolAfter'], /--relay takes key=value pairs separated by commas, not "spoolAfter"/],
      [['intake'], /Unexpected argument 'intake'/],
    ];
    for (const [argv, message] of refused) {
      assert.throws(() => parseOptions(argv), (err: unknown) => err instanceof UsageError && message.test(err.message), argv.join(' '));
    }
  });

  test('the command says a mistake in one line and exits 1 before it measures anything', () => {
    const run = spawnSync(process.execPath, ['--import', 'tsx', RUN_TS, '--quick', '--only', 'fsync', '--repeat', '2'], { encoding: 'utf8', timeout: 60_000 });
    assert.equal(run.status, 1, run.stderr);
    assert.equal(run.stdout, '');
    assert.match(run.stderr, /^bench: Unknown option '--repeat'[^\n]*\(the README lists the flags under Performance\)\n$/);
  });
});
