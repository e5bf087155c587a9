import assert from 'node:assert/strict';
import { test } from 'node:test';
import { printJson } from '../../src/cli/context.js';
import { formatAge, formatBytes, formatFields, formatTable } from '../../src/cli/table.js';

test('text from mail reaches the terminal without control characters: C0, DEL, C1 and bidirectional overrides become ?', () => {
  const reply = '550 5.1.1 No such user \x1b[2J\u009b31mC1 \u202eRTL\u2066x\u2069 \x7f end\r\nnext';
  const address = 'gnp.exe\u202e@example.com';
  const fields = formatFields([
    ['reply', reply],
    ['from', address],
  ]);
  assert.equal(fields, 'reply: 550 5.1.1 No such user ?[2J?31mC1 ?RTL?x? ? end next\nfrom:  gnp.exe?@example.com');
  const table = formatTable([{ address }], [{ header: 'ADDRESS', value: (r) => r.address }]);
  assert.ok(!/[\u0080-\u009f\u202a-\u202e\u2066-\u2069\x00-\x09\x0b-\x1f]/.test(table), table);
  // what is printable stays as it is, non-ASCII letters included
  assert.equal(formatFields([['to', 'jürgen@münchen.de']]), 'to: jürgen@münchen.de');
});

test('--json writes what a terminal would act on as \\u escapes: to a JSON reader the values are the same', () => {
  const value = { from: 'gnp.exe\u202e@example.com', reply: '550 \u009b31mred\u009b0m \u2028next \x7f', to: 'jürgen@münchen.de' };
  let out = '';
  const write = process.stdout.write;
  process.stdout.write = ((chunk: string) => {
    out += chunk;
    return true;
  }) as typeof process.stdout.write;
  try {
    printJson(value);
  } finally {
    process.stdout.write = write;
  }
  assert.ok(!/[\u007f-\u009f\u2028\u202e]/.test(out), out);
  assert.match(out, /"gnp\.exe\\u202e@example\.com"/);
  assert.match(out, /"to": "jürgen@münchen\.de"/);
  assert.deepEqual(JSON.parse(out), value);
});

test('an age is in seconds below 2 minutes, minutes below 2 hours, hours below 2 days, then days; a clock behind the data is 0s', () => {
  assert.deepEqual(
    [-5000, 0, 119_000, 120_000, 7_199_000, 7_200_000, 172_799_000, 172_800_000, 30 * 86_400_000].map(formatAge),
    ['0s', '0s', '119s', '2m', '120m', '2h', '48h', '2d', '30d'],
  );
});

test('sizes are in bytes below 1 KiB, then KiB and MiB to a tenth, then GiB to a hundredth, in the unit of the rounded figure', () => {
  assert.deepEqual(
    [0, 1023, 1024, 1536, 1024 * 1024 - 1, 1024 * 1024, 5.25 * 1024 * 1024, 1024 ** 3 - 1, 3.5 * 1024 ** 3].map(formatBytes),
    ['0 B', '1023 B', '1.0 KiB', '1.5 KiB', '1.0 MiB', '1.0 MiB', '5.3 MiB', '1.00 GiB', '3.50 GiB'],
  );
});

test('columns line up in terminal columns: a CJK address or an emoji takes two, a combining accent none, and a cut never splits a character', () => {
  const rows = [
    { to: 'ascii@example.com', n: 1, reply: 'plain' },
    { to: '用户@例子.中国', n: 22, reply: 'ok 👍🏽 thanks' },
    { to: 'jose\u0301@example.com', n: 333, reply: '日本語の返事です' },
  ];
  const table = formatTable(rows, [
    { header: 'TO', value: (r) => r.to },
    { header: 'N', value: (r) => r.n, right: true },
    { header: 'REPLY', value: (r) => r.reply, max: 9 },
  ]);
  assert.equal(
    table,
    [
      'TO                   N  REPLY',
      'ascii@example.com    1  plain',
      '用户@例子.中国      22  ok 👍🏽 th…',
      'jose\u0301@example.com   333  日本語の…',
    ].join('\n'),
  );
});

test('a cell exactly as wide as its column limit is shown whole; one column more is cut with an ellipsis', () => {
  const rows = [{ reply: '日本語の' }, { reply: 'abcdefgh' }, { reply: 'abcdefghi' }];
  const table = formatTable(rows, [{ header: 'REPLY', value: (r) => r.reply, max: 8 }]);
  assert.equal(table, ['REPLY', '日本語の', 'abcdefgh', 'abcdefg…'].join('\n'));
});
