// Property: whatever sequence of commands a client sends, the relay does not crash, every 250
// to the end of DATA is exactly one stored message under the id it announced, nothing else is
// stored, and every reply is one the spec's §2 table or the ordinary SMTP protocol allows.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import fc from 'fast-check';
import type { Relay } from '../../src/main.js';
import { SmtpClient, startTestRelay } from '../helpers.js';
import { INTAKE_ONLY, queuedId } from './smtp-session.js';

const USER = 'prop-user';
const PASSWORD = 'prop-pass';
const MAX_SIZE = 2048;

/**
 * Reply code → enhanced codes it may carry ('' = none). The spec's table, plus the replies of the
 * ordinary protocol: greeting, EHLO, QUIT, AUTH challenges, 354, HELP, VRFY, syntax and sequence
 * errors, a non-ASCII local part without SMTPUTF8 (553), an unknown MAIL/RCPT parameter (555),
 * and smtp-server's own 421 for a line too long or too many unrecognized commands.
 */
const ALLOWED: Record<string, readonly string[]> = {
  '214': ['2.0.0'],
  '220': ['', '2.0.0'],
  '221': ['2.0.0'],
  '235': ['2.7.0'],
  '250': ['', '2.0.0', '2.1.0', '2.1.5'],
  '252': ['2.0.0'],
  '334': [''],
  '354': [''],
  '421': ['4.7.0', '4.3.2', '4.4.2'],
  '451': ['4.7.1', '4.3.0'],
  '452': ['4.3.1', '4.5.3'],
  '500': ['5.5.2'],
  '501': ['5.1.3', '5.5.2', '5.5.4'],
  '502': ['5.5.1'],
  '503': ['5.5.1'],
  '504': ['5.5.4'],
  '530': ['5.7.0'],
  '535': ['5.7.8'],
  '538': ['5.7.11'],
  '550': ['5.6.0'],
  '552': ['5.3.4'],
  '553': ['5.6.7'],
  '554': ['5.7.1'],
  '555': ['5.5.4'],
};

function checkReply(reply: string, sent: string): void {
  for (const line of reply.split(/\r?\n/)) {
    const m = /^(\d{3})[ -](?:(\d\.\d{1,3}\.\d{1,3}) )?/.exec(line);
    assert.ok(m, `malformed reply line ${JSON.stringify(line)} to ${JSON.stringify(sent)}`);
    const allowed = ALLOWED[m[1]];
    assert.ok(allowed, `reply code outside the spec: ${JSON.stringify(line)} to ${JSON.stringify(sent)}`);
    // RFC 2034 §3: no enhanced codes on replies to HELO/EHLO
    if (!m[2] && /^(HELO|EHLO)\b/i.test(sent)) continue;
    assert.ok(allowed.includes(m[2] ?? ''), `enhanced code not allowed with ${m[1]}: ${JSON.stringify(line)} to ${JSON.stringify(sent)}`);
  }
}

/** One step of a session: a command line, or DATA followed by a body when it gets 354. */
type Step = { kind: 'line'; line: string } | { kind: 'data'; body: string } | { kind: 'transaction'; steps: Step[] };

const address = fc.oneof(
  fc.constantFrom('a@example.com', 'B@Example.COM', 'x.y+z@example.org', 'user@[192.0.2.1]', ''),
  fc.constantFrom('no-at-sign', '@example.com', 'a@', 'a@@b', 'a b@example.com', 'a\0@example.com', 'a@exa\rmple.com', 'ü@exämple.com'),
  fc.stringMatching(/^[a-z0-9._%+-]{1,20}@[a-z0-9-]{1,12}\.[a-z]{2,4}$/),
);

const garbage = fc
  .string({ unit: 'binary', maxLength: 80 })
  .map((s) => s.replace(/\n/g, ' '));

const body = fc.oneof(
  fc.constant('Subject: clean\r\n\r\nclean body\r\n'),
  fc.constant(''),
  // dot-stuffed lines, one of which is a lone "." once unstuffed
  fc.constant('Subject: dots\r\n\r\n..leading dot\r\n..\r\n'),
  fc.constantFrom('a\n.\nMAIL FROM:<e@example.com>\r\n', 'x\r.\r', 'y\n.\r\n', 'z\r\n.\n', 'lone\rcr\r\n', 'lone\nlf\r\n'),
  fc.constant(`Subject: big\r\n\r\n${'b'.repeat(MAX_SIZE)}\r\n`),
  fc.string({ unit: 'binary', maxLength: 200 }).map((s) => `Subject: random\r\n\r\n${s.replace(/[\r\n]/g, ' ')}\r\n`),
);

const credentials = (user: string, password: string) => Buffer.from(`\0${user}\0${password}`).toString('base64');

const step: fc.Arbitrary<Step> = fc.oneof(
  { weight: 3, arbitrary: fc.constantFrom('EHLO prop.test', 'HELO prop.test', 'EHLO', 'LHLO prop.test').map(line) },
  { weight: 5, arbitrary: fc.tuple(address, fc.constantFrom('', ' SIZE=100', ` SIZE=${MAX_SIZE * 4}`, ' BODY=8BITMIME', ' SMTPUTF8', ' FOO=bar', ' ENVID=x\u0001y')).map(([a, p]) => line(`MAIL FROM:<${a}>${p}`)) },
  { weight: 6, arbitrary: address.map((a) => line(`RCPT TO:<${a}>`)) },
  { weight: 4, arbitrary: body.map((b): Step => ({ kind: 'data', body: b })) },
  // a whole transaction in order, so that random sessions also reach the end of DATA
  {
    weight: 4,
    arbitrary: fc
      .tuple(address, fc.array(address, { minLength: 1, maxLength: 7 }), body)
      .map(([from, rcpts, b]): Step => ({ kind: 'transaction', steps: [line(`MAIL FROM:<${from}>`), ...rcpts.map((r) => line(`RCPT TO:<${r}>`)), { kind: 'data', body: b }] })),
  },
  { weight: 2, arbitrary: fc.constantFrom('RSET', 'NOOP', 'HELP', 'VRFY a@example.com', 'EXPN list', 'STARTTLS', 'BDAT 10 LAST', 'QUIT').map(line) },
  {
    weight: 2,
    arbitrary: fc
      .constantFrom(
        `AUTH PLAIN ${credentials(USER, PASSWORD)}`,
        `AUTH PLAIN ${credentials(USER, 'wrong')}`,
        'AUTH PLAIN !!!',
        'AUTH LOGIN',
        'AUTH XOAUTH2 abc',
        'AUTH',
      )
      .map(line),
  },
  { weight: 2, arbitrary: garbage.map(line) },
  { weight: 1, arbitrary: fc.constantFrom('X'.repeat(20 * 1024), 'GET / HTTP/1.1').map(line) },
);

function line(text: string): Step {
  return { kind: 'line', line: text };
}

const authenticated: Step[] = [line('EHLO prop.test'), line(`AUTH PLAIN ${credentials(USER, PASSWORD)}`)];

/**
 * Half the sessions start authenticated, so that mail transactions get far enough to be stored.
 * At most one further AUTH per session: failed AUTHs are slowed down on purpose, and runs must
 * stay fast.
 */
const session = fc
  .tuple(fc.boolean(), fc.array(step, { minLength: 1, maxLength: 25 }))
  .filter(([, steps]) => steps.filter((s) => s.kind === 'line' && /^AUTH/.test(s.line)).length <= 1)
  .map(([login, steps]) => [...(login ? authenticated : []), ...steps.flatMap((s) => (s.kind === 'transaction' ? s.steps : [s]))]);

describe('property: random SMTP sessions against a live relay', () => {
  let relay: Relay;
  before(async () => {
    relay = await startTestRelay({ defaultUsername: USER, defaultPassword: PASSWORD, maxMessageSize: MAX_SIZE, maxRecipients: 5 }, INTAKE_ONLY);
  });
  after(() => relay.stop());

  const storedIds = () => new Set((relay.store.sqlite.prepare('SELECT id FROM messages').all() as Array<{ id: string }>).map((r) => r.id));

  test('never crashes; every 250 after DATA is exactly one stored message; only allowed replies', async () => {
    let run = 0;
    let stored = 0;
    await fc.assert(
      fc.asyncProperty(session, async (steps) => {
        run++;
        const before = storedIds();
        const acknowledged: string[] = [];
        // every run from its own loopback address: AUTH failures of one run do not slow the next
        const c = await SmtpClient.connect(relay.smtpPort, '127.0.0.1', `127.${(run >> 16) & 255}.${(run >> 8) & 255}.${(run & 255) || 1}`);
        try {
          const greeting = await c.read();
          assert.match(greeting, /^220 /);
          for (const s of steps) {
            if (c.closed) break;
            const sent = s.kind === 'line' ? s.line : 'DATA';
            assert.notEqual(s.kind, 'transaction');
            const reply = await c.send(sent);
            if (reply === '') break;
            checkReply(reply, sent);
            if (s.kind === 'data' && reply.startsWith('354')) {
              // the end-of-data line must follow a CRLF, or the server keeps reading
              const end = s.body === '' || s.body.endsWith('\r\n') ? '.\r\n' : '\r\n.\r\n';
              c.write(Buffer.from(s.body + end, 'latin1'));
              const final = await c.read();
              if (final === '') break;
              checkReply(final, '<message>');
              const id = queuedId(final);
              if (id) acknowledged.push(id);
              else assert.doesNotMatch(final, /^2/, 'a 2xx to DATA names its queue id');
            }
          }
        } finally {
          c.close();
        }
        const added = [...storedIds()].filter((id) => !before.has(id));
        assert.equal(new Set(acknowledged).size, acknowledged.length, 'an id announced twice');
        assert.deepEqual(added.sort(), [...acknowledged].sort(), 'stored messages = acknowledged messages');
        stored += added.length;
        // still alive and serving
        assert.ok(relay.intake.isListening);
      }),
      {
        numRuns: 50,
        includeErrorInReport: true,
        // one known-good session besides the random ones, so "stored > 0" below cannot be luck
        examples: [[[...authenticated, line('MAIL FROM:<a@example.com>'), line('RCPT TO:<b@example.com>'), { kind: 'data', body: 'Subject: x\r\n\r\nx\r\n' }]]],
      },
    );
    assert.ok(run >= 50, `only ${run} runs`); // the example and 50 generated sessions
    // the sequences reached the end of DATA, not just refusals
    assert.ok(stored > 0, 'no run stored a message');
  });
});
