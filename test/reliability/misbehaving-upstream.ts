// A smart host that misbehaves on purpose: a raw TCP server on 127.0.0.1 that speaks just enough
// SMTP to take mail, and whose behaviour a test switches between attempts (refuse the greeting,
// never answer, drop the connection after DATA, botch STARTTLS, refuse some RCPTs or DATA, accept
// when the test says so). It records what it received, answered or not, so a test can count deliveries.
import net from 'node:net';

/** 'twice': a second `220` line after the first, one reply too many: every later reply is one out of step. */
export type Greeting = 'ok' | 'silent' | 'twice' | { reply: string };
export type StartTls = 'not-offered' | { reply: string } | 'garbage-handshake';
/** `until`: accept once the promise settles (an upstream that thinks for as long as the test wants). */
export type DataEnd = 'ok' | 'drop' | 'silent' | { reply: string } | { until: Promise<void> };

export interface Behaviour {
  greeting: Greeting;
  startTls: StartTls;
  /** Reply line for RCPT TO <address>; undefined accepts. */
  rcpt: (address: string) => string | undefined;
  /** Reply line for DATA instead of `354` (the message is then not read as such). */
  data?: string;
  /** After the `354`, stop reading: a large message never leaves the client's buffers in full. */
  stallData?: boolean;
  dataEnd: DataEnd;
}

export const WELL_BEHAVED: Behaviour = { greeting: 'ok', startTls: 'not-offered', rcpt: () => undefined, dataEnd: 'ok' };

export interface Transaction {
  from: string;
  /** Recipients the upstream accepted with 250. */
  to: string[];
  raw: Buffer;
  /** The reply given to the end of DATA, or null if none was given. */
  answered: string | null;
}

export interface MisbehavingUpstream {
  port: number;
  behaviour: Behaviour;
  /** Every transaction whose DATA arrived in full. */
  transactions: Transaction[];
  /** Every RCPT TO seen, accepted or not, in order. */
  rcpts: string[];
  /** Commands seen after a failed STARTTLS (there must be none: no fallback to plain text). */
  afterStartTls: string[];
  connections: number;
  /** Transactions that got 250, per recipient: how often each address received mail. */
  deliveriesTo(address: string): number;
  close(): Promise<void>;
}

export async function startMisbehavingUpstream(port = 0): Promise<MisbehavingUpstream> {
  const sockets = new Set<net.Socket>();
  const upstream: MisbehavingUpstream = {
    port: 0,
    behaviour: { ...WELL_BEHAVED },
    transactions: [],
    rcpts: [],
    afterStartTls: [],
    connections: 0,
    deliveriesTo: (address) => upstream.transactions.filter((t) => t.answered?.startsWith('250') && t.to.includes(address)).length,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };

  const server = net.createServer((socket) => {
    upstream.connections++;
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => {});
    // the greeting is decided when the connection opens, every later reply when it is due: a
    // client's pooled connection sees a test's switch at once
    const b = upstream.behaviour;
    const say = (line: string) => {
      if (!socket.destroyed) socket.write(`${line}\r\n`);
    };
    if (b.greeting === 'silent') return;
    if (typeof b.greeting === 'object') {
      say(b.greeting.reply);
      socket.end();
      return;
    }
    say('220 upstream.test ESMTP misbehaving');
    if (b.greeting === 'twice') say('220 upstream.test second banner line');

    let buffer = Buffer.alloc(0);
    let inData = false;
    let startTlsFailed = false;
    let tlsGarbage = false;
    let tx: Transaction | undefined;

    const endOfData = (t: Transaction) => {
      upstream.transactions.push(t);
      const end = upstream.behaviour.dataEnd;
      if (end === 'ok') {
        t.answered = '250 2.0.0 accepted';
        say(t.answered);
      } else if (end === 'drop') {
        socket.destroy();
      } else if (end === 'silent') {
        // never answer; the client has to give up by itself
      } else if ('reply' in end) {
        t.answered = end.reply;
        say(end.reply);
      } else {
        end.until.then(() => {
          t.answered = '250 2.0.0 accepted, slowly';
          say(t.answered);
        });
      }
    };

    const command = (line: string) => {
      if (startTlsFailed) {
        upstream.afterStartTls.push(line);
        return;
      }
      const verb = line.slice(0, 4).toUpperCase();
      const now = upstream.behaviour;
      if (verb === 'EHLO') {
        say('250-upstream.test');
        if (now.startTls !== 'not-offered') say('250-STARTTLS');
        say('250-PIPELINING');
        say('250-8BITMIME');
        say('250 SIZE 52428800');
      } else if (verb === 'HELO') {
        say('250 upstream.test');
      } else if (verb === 'STAR') {
        if (now.startTls === 'not-offered') return say('502 5.5.1 not offered');
        startTlsFailed = true;
        if (now.startTls === 'garbage-handshake') {
          tlsGarbage = true;
          say('220 2.0.0 go ahead');
          // whatever the client's ClientHello says, answer with bytes that are not TLS
          socket.once('data', () => socket.write('this is not a TLS server hello\r\n'));
          return;
        }
        say(now.startTls.reply);
        startTlsFailed = false;
      } else if (verb === 'MAIL') {
        tx = { from: /<([^>]*)>/.exec(line)?.[1] ?? '', to: [], raw: Buffer.alloc(0), answered: null };
        say('250 2.1.0 ok');
      } else if (verb === 'RCPT') {
        const address = /<([^>]*)>/.exec(line)?.[1] ?? '';
        upstream.rcpts.push(address);
        const refusal = now.rcpt(address);
        if (refusal) return say(refusal);
        tx?.to.push(address);
        say('250 2.1.5 ok');
      } else if (verb === 'DATA') {
        if (!tx || tx.to.length === 0) return say('503 5.5.1 no valid recipients');
        if (now.data) return say(now.data);
        inData = true;
        say('354 go ahead');
        if (now.stallData) socket.pause();
      } else if (verb === 'RSET') {
        tx = undefined;
        say('250 2.0.0 ok');
      } else if (verb === 'NOOP') {
        say('250 2.0.0 ok');
      } else if (verb === 'QUIT') {
        say('221 2.0.0 bye');
        socket.end();
      } else {
        say('500 5.5.2 unknown command');
      }
    };

    socket.on('data', (chunk: Buffer) => {
      if (tlsGarbage) return;
      buffer = Buffer.concat([buffer, chunk]);
      for (;;) {
        if (inData) {
          const end = buffer.indexOf('\r\n.\r\n');
          if (end === -1) return;
          const t = tx as Transaction;
          t.raw = unstuff(buffer.subarray(0, end + 2));
          buffer = buffer.subarray(end + 5);
          inData = false;
          tx = undefined;
          endOfData(t);
          continue;
        }
        const eol = buffer.indexOf('\r\n');
        if (eol === -1) return;
        const line = buffer.subarray(0, eol).toString('latin1');
        buffer = buffer.subarray(eol + 2);
        command(line);
      }
    });
  });

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => resolve());
  });
  upstream.port = (server.address() as net.AddressInfo).port;
  return upstream;
}

/** Undoes SMTP dot-stuffing ("\r\n.." at a line start → "\r\n."). */
function unstuff(data: Buffer): Buffer {
  const text = data.toString('latin1');
  return Buffer.from(text.replace(/^\.\./, '.').replace(/\r\n\.\./g, '\r\n.'), 'latin1');
}
