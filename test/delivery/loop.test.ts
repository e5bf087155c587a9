import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { Relay } from '../../src/main.js';
import { closedPort, messageCount, sendMail, startTestRelay, waitFor } from '../helpers.js';

function states(relay: Relay): Record<string, number> {
  const rows = relay.store.sqlite.prepare('SELECT state, COUNT(*) AS n FROM messages GROUP BY state').all() as Array<{ state: string; n: number }>;
  return Object.fromEntries(rows.map((r) => [r.state, r.n]));
}

test('two relays that forward to each other end the loop: the copy with 50 Received: headers is refused with 554 5.4.6 and fails', async () => {
  const portA = await closedPort();
  const portB = await closedPort();
  const a = await startTestRelay({ smtpPort: portA, forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: portB });
  const b = await startTestRelay({ smtpPort: portB, forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: portA });
  try {
    await sendMail(portA, { to: ['loop@example.com'] });
    // A records its delivery of copy 49 only after B's 250; B may refuse copy 50 back before that
    const settled = () => !states(a).sending && !states(b).sending;
    await waitFor(() => (states(a).failed ?? 0) + (states(b).failed ?? 0) === 1 && settled(), 60_000, 'one copy to fail, and no attempt left');
    // copy n holds n Received: headers and sits on A when n is odd: the 50th, on B, was refused by A
    assert.deepEqual(states(a), { delivered: 25 });
    assert.deepEqual(states(b), { delivered: 24, failed: 1 });
    const failed = b.store.sqlite.prepare(`SELECT last_error FROM messages WHERE state = 'failed'`).get() as { last_error: string };
    assert.match(failed.last_error, /554 5\.4\.6 Too many hops: 50 /);
    assert.equal(messageCount(a) + messageCount(b), 50);
  } finally {
    await a.stop();
    await b.stop();
  }
});
