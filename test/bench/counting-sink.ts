// The upstream the benchmark's relays forward to: an SMTP server on raw sockets that counts what
// it is sent and stores nothing. It runs on the same cores as the relay it measures, so it should
// cost little: smtp-server, which the ceilings use, spent 290-330 µs of CPU on each message it
// received from relayq, about what relayq spends receiving one. This one answers a pipelined
// batch of commands with one write and finds the end of DATA with Buffer.indexOf, without
// unstuffing dots (its byte count includes them).
import net from 'node:net';

export interface SinkCounters {
  messages: number;
  recipients: number;
  /** Bytes between DATA's 354 and the final dot, as sent (dot-stuffed). */
  bytes: number;
  connections: number;
  /** Date.now() of the first and the latest message. */
  firstAt: number;
  lastAt: number;
}

export function newCounters(): SinkCounters {
  return { messages: 0, recipients: 0, bytes: 0, connections: 0, firstAt: 0, lastAt: 0 };
}

const END_OF_DATA = Buffer.from('\r\n.\r\n');
const EHLO_REPLY = '250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 67108864\r\n';

/** What a session needs of its socket (a net.Socket, or a stand-in in tests). */
export type SinkSocket = Pick<net.Socket, 'setNoDelay' | 'on' | 'write' | 'end'>;

/** One session: the command lines, or the message between DATA and its final dot. */
export class SinkSession {
  private inData = false;
  /** Partial command line (command mode), or the last bytes of the message so far (data mode). */
  private carry = Buffer.alloc(0);
  private recipients = 0;
  private bytes = 0;
  private quit = false;

  constructor(
    private readonly socket: SinkSocket,
    private readonly counters: SinkCounters,
  ) {
    counters.connections++;
    socket.setNoDelay(true);
    socket.on('error', () => {
      // a relay killed mid-session: nothing to count
    });
    socket.on('data', (chunk) => this.receive(chunk as Buffer));
    socket.write('220 sink ESMTP\r\n');
  }

  /** One read's worth of bytes from the client. */
  receive(chunk: Buffer): void {
    if (this.quit) return;
    let replies = '';
    let rest = chunk;
    while (rest.length > 0 && !this.quit) {
      if (this.inData) {
        const end = this.endOfData(rest);
        if (end < 0) break;
        replies += this.messageEnded();
        rest = rest.subarray(end);
      } else {
        const input = this.carry.length ? Buffer.concat([this.carry, rest]) : rest;
        const eol = input.indexOf('\r\n');
        if (eol < 0) {
          this.carry = Buffer.from(input);
          break;
        }
        this.carry = Buffer.alloc(0);
        replies += this.command(input.toString('latin1', 0, eol));
        rest = input.subarray(eol + 2);
      }
    }
    if (this.quit) this.socket.end(replies);
    else if (replies) this.socket.write(replies);
  }

  /**
   * Where the message ends in `chunk` (the offset just past its final dot line), or -1 when it
   * goes on; counts its bytes either way. Keeps the last four bytes for a dot line that is split
   * between two chunks.
   */
  private endOfData(chunk: Buffer): number {
    const head = chunk.subarray(0, END_OF_DATA.length - 1);
    const seam = Buffer.concat([this.carry, head]).indexOf(END_OF_DATA);
    let end = -1;
    if (seam >= 0 && seam < this.carry.length) end = seam + END_OF_DATA.length - this.carry.length;
    else {
      const found = chunk.indexOf(END_OF_DATA);
      if (found >= 0) end = found + END_OF_DATA.length;
    }
    if (end < 0) {
      this.bytes += chunk.length;
      // the last four bytes so far: of this chunk alone unless it is shorter (no copy of a large one)
      const keep = END_OF_DATA.length - 1;
      const last = chunk.length >= keep ? chunk.subarray(chunk.length - keep) : Buffer.concat([this.carry, chunk]).subarray(-keep);
      this.carry = Buffer.from(last);
      return -1;
    }
    // the message keeps the CRLF before the dot; ".\r\n" ends it
    this.bytes += end - 3;
    this.carry = Buffer.alloc(0);
    return end;
  }

  private messageEnded(): string {
    this.inData = false;
    const now = Date.now();
    const c = this.counters;
    if (c.messages === 0) c.firstAt = now;
    c.lastAt = now;
    c.messages++;
    c.recipients += this.recipients;
    c.bytes += this.bytes;
    this.recipients = 0;
    return '250 2.0.0 Ok: stored nothing\r\n';
  }

  private command(line: string): string {
    switch (line.slice(0, 4).toUpperCase()) {
      case 'EHLO':
        return EHLO_REPLY;
      case 'HELO':
      case 'NOOP':
        return '250 2.0.0 Ok\r\n';
      case 'MAIL':
      case 'RSET':
        this.recipients = 0;
        return '250 2.0.0 Ok\r\n';
      case 'RCPT':
        this.recipients++;
        return '250 2.1.5 Ok\r\n';
      case 'DATA':
        if (this.recipients === 0) return '554 5.5.1 No valid recipients\r\n';
        this.inData = true;
        this.bytes = 0;
        // the message starts at the beginning of a line, so an empty one is just ".\r\n"
        this.carry = Buffer.from('\r\n');
        return '354 End data with <CR><LF>.<CR><LF>\r\n';
      case 'QUIT':
        this.quit = true;
        return '221 2.0.0 Bye\r\n';
      default:
        return '502 5.5.2 Command not implemented\r\n';
    }
  }
}

/** A counting sink; listen on it as on any net.Server. */
export function createCountingSink(counters: SinkCounters): net.Server {
  return net.createServer((socket) => new SinkSession(socket, counters));
}
