import assert from 'node:assert/strict';
import { test } from 'node:test';
import { addressKey, decodeIdnDomain, domainToAscii, normalizeForEnvelope } from '../../src/address.js';
import { BareLineEndingScanner, isValidAddress, ReceivedHeaderCounter } from '../../src/smtp/message.js';

test('Received: header fields are counted however the bytes arrive split, in the header section only', () => {
  const message = Buffer.from(
    `Received: a\r\nSubject: ${'x'.repeat(100)}\r\nreceived:b\r\nReceived:\r\nX-Received: no\r\nReceived \t: d\r\nReceived-SPF: no\r\nReceivedX: no\r\n Received: folded, no\r\nReceive\r\n` +
      'RECEIVED: c\r\n\r\nReceived: in the body\r\n',
  );
  for (let size = 1; size <= message.length; size++) {
    const counter = new ReceivedHeaderCounter();
    for (let i = 0; i < message.length; i += size) counter.scan(message.subarray(i, i + size));
    assert.equal(counter.count, 5, `chunks of ${size} bytes`);
  }
});

test('a first line that starts with a space or tab is noticed however the bytes arrive split', () => {
  const starts = (...chunks: string[]) => {
    const counter = new ReceivedHeaderCounter();
    for (const c of chunks) counter.scan(Buffer.from(c));
    return counter.startsFolded;
  };
  assert.equal(starts('', ' x\r\n'), true, 'after an empty chunk');
  assert.equal(starts('\t', 'x\r\n'), true);
  assert.equal(starts('Subject: x\r\n', ' folded\r\n'), false, 'a folded field further down');
  assert.equal(starts('x', ' y\r\n'), false);
  assert.equal(starts(), false, 'an empty message');
  // such a message has no header section, so its Received: lines are no hops
  const counter = new ReceivedHeaderCounter();
  counter.scan(Buffer.from(` x\r\n${'Received: from h\r\n'.repeat(60)}\r\nbody\r\n`));
  assert.equal(counter.count, 0);
});

test('a bare LF or CR is found wherever two or three chunks split the message; CRLF split between chunks is not one', () => {
  // a lone CR at the end of one chunk is decided by the next one, and not forgotten after it
  const split = (message: string, a: number, b: number) => {
    const bytes = Buffer.from(message);
    const scanner = new BareLineEndingScanner();
    scanner.scan(bytes.subarray(0, a));
    scanner.scan(bytes.subarray(a, b));
    scanner.scan(bytes.subarray(b));
    return scanner.finish();
  };
  const bare = ['Subject: x\r\n\r\nab\nXYZ\r\n', 'Subject: x\r\n\r\nab\rWXYZ\r\n', 'Subject: x\r\n\r\nab\r\r\n', 'Subject: x\r\n\r\nend\r', 'Subject: x\r\n\r\nab\r.\nXYZ\r\n'];
  const clean = 'Subject: x\r\n\r\nab\r\nXYZ\r\n';
  for (const message of bare) {
    for (let a = 0; a <= message.length; a++) {
      for (let b = a; b <= message.length; b++) assert.equal(split(message, a, b), true, `${JSON.stringify(message)} split at ${a} and ${b}`);
    }
  }
  for (let a = 0; a <= clean.length; a++) {
    for (let b = a; b <= clean.length; b++) assert.equal(split(clean, a, b), false, `clean, split at ${a} and ${b}`);
  }
});

test("internationalized domains are mapped by relayq's own IDNA tables (Unicode 15.1 and later), the same on every Node version", () => {
  // Node 20's URL parser maps ẞ to ss and Node 26's to ß; the keys relayq stores must not follow it
  assert.equal(decodeIdnDomain('h@ẞ.de'), 'h@ß.de');
  assert.equal(addressKey('H@ẞ.DE'), addressKey('h@ß.de'));
  assert.notEqual(addressKey('h@ß.de'), addressKey('h@ss.de'));
  assert.equal(normalizeForEnvelope('h@ẞ.de'), 'h@xn--zca.de');
  assert.equal(domainToAscii('MÜNCHEN.de'), 'xn--mnchen-3ya.de');
  assert.equal(decodeIdnDomain('h@XN--MNCHEN-3YA.DE'), 'h@münchen.de');
  // Node 26 takes these for valid domains
  assert.equal(domainToAscii('XN--A-ECP.de'), '');
  assert.equal(domainToAscii('xn--99999999999999.com'), '');
  assert.equal(decodeIdnDomain('b@XN--A-ECP.de'), 'b@XN--A-ECP.de', 'one IDNA refuses stays as written');
  // Node's URL parser ends a host at / ? or #: münchen.de/x would be münchen.de
  for (const domain of ['münchen.de/x', 'münchen.de?x', 'mü#nchen.de', 'mü%nchen.de']) assert.equal(domainToAscii(domain), '', domain);
});

test('a label that is not ASCII is refused only when it starts with xn-- once mapped: -- in its third and fourth code units is no prefix', () => {
  for (const domain of ['XN--ｍｎcheｎ-3ｙa.de', 'ｘｎ--mnchen-3ya.de', 'Ｘｎ--mnchen-3ya.de']) assert.equal(isValidAddress(`a@${domain}`, false), false, domain);
  // a character outside the BMP is two code units; a decomposed ü is two characters
  for (const domain of ['𠮷--屋.jp', '😀--a.example', 'u\u0308--x.de', 'zü--x.de', 'XN--Z--X-0RA.DE', 'ab--cd.de']) assert.equal(isValidAddress(`a@${domain}`, false), true, domain);
});
