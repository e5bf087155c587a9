import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ReceivedHeaderCounter } from '../../src/smtp/message.js';

test('Received: header fields are counted however the bytes arrive split, in the header section only', () => {
  const message = Buffer.from(
    `Received: a\r\nSubject: ${'x'.repeat(100)}\r\nreceived:b\r\nX-Received: no\r\nReceived \t: d\r\nReceived-SPF: no\r\nReceivedX: no\r\n Received: folded, no\r\nReceive\r\n` +
      'RECEIVED: c\r\n\r\nReceived: in the body\r\n',
  );
  for (let size = 1; size <= message.length; size++) {
    const counter = new ReceivedHeaderCounter();
    for (let i = 0; i < message.length; i += size) counter.scan(message.subarray(i, i + size));
    assert.equal(counter.count, 4, `chunks of ${size} bytes`);
  }
});
