// What intake does to a message's bytes and addresses: validation of envelope paths, the
// bare-CR/LF scan that refuses SMTP smuggling, the count of Received: headers that stops a mail
// loop, and the one Received: header relayq prepends.
import net from 'node:net';
import { domainToAscii, isAscii, isIdnDomain, MAX_ADDRESS_LENGTH } from '../address.js';

const ADDRESS = /^[^\s@<>()\\,;:"[\]\x00-\x1f\x7f]+@[^\s@<>()\\,;:"[\]\x00-\x1f\x7f]+$/u;
/** local@[192.0.2.1] or local@[IPv6:2001:db8::1]: a domain that is an address literal (RFC 5321 §4.1.3). */
const ADDRESS_LITERAL = /^[^\s@<>()\\,;:"[\]\x00-\x1f\x7f]+@\[(IPv6:)?([0-9a-f.:]+)\]$/iu;
/** The longest address smtp-server takes as a client writes it (local@domain, no brackets). */
const MAX_PATH_ADDRESS_LENGTH = 253;

/**
 * An envelope path relayq accepts: local@domain without controls or spaces, whose domain's labels
 * start and end with a letter or digit and are at most 63 octets in ASCII form (RFC 5321
 * §4.1.2), local@[address literal], or '' (null sender). Quoted local parts are not accepted,
 * nor is an address that is not UTF-8. It is at most 253 characters with its domain in the ASCII
 * form it goes upstream in, whichever form the client wrote: smtp-server refuses a longer one as
 * written (RFC 5321 §4.5.3.1.3: a path is 256 octets at most, with its brackets), and an upstream
 * would refuse it in ASCII.
 */
export function isValidAddress(address: string, allowEmpty: boolean): boolean {
  if (address === '') return allowEmpty;
  if (address.length > MAX_ADDRESS_LENGTH) return false;
  // U+FFFD: bytes that are not UTF-8, as smtp-server decoded them; stored, they would be another address
  if (/[\r\n\0\uFFFD]/.test(address)) return false;
  if (ADDRESS.test(address)) {
    const at = address.lastIndexOf('@');
    const ascii = asciiDomain(address.slice(at + 1));
    return ascii !== undefined && at + 1 + ascii.length <= MAX_PATH_ADDRESS_LENGTH;
  }
  const literal = ADDRESS_LITERAL.exec(address);
  return literal !== null && (literal[1] ? net.isIPv6(literal[2]) : net.isIPv4(literal[2]));
}

/**
 * The domain in ASCII, or undefined when it is no valid one: a label is empty (`a..b`, a leading
 * or trailing dot, a label IDNA maps to nothing, as a soft hyphen, or the `xn--` label with
 * nothing after it that smtp-server decodes to nothing: `b@a.xn--` reaches relayq as `b@a.`),
 * starts or ends with '-' (as written, an internationalized one too, or once IDNA has mapped it:
 * `ab－` is `ab-`), or is over 63 octets in ASCII; or IDNA refuses it. An `xn--` label is checked
 * in any case: smtp-server decodes only lower-case ones, and `XN--A-ECP` is as invalid as
 * `xn--a-ecp`.
 */
function asciiDomain(domain: string): string | undefined {
  const ascii = isIdnDomain(domain) ? domainToAscii(domain) : domain;
  if (ascii === '') return undefined;
  // as written, and in ASCII: IDNA maps a fullwidth hyphen (U+FF0D) to '-'
  const fits = (label: string) => label !== '' && !label.startsWith('-') && !label.endsWith('-');
  // a label that starts `xn--` once mapped is an A-label, all ASCII as written: `XN--ｍｎcheｎ-3ｙa`
  // and `ｘｎ--mnchen-3ya` are none (smtp-server refuses the first in lower case)
  const written = (label: string) => fits(label) && (isAscii(label) || !label.normalize('NFKC').toLowerCase().startsWith('xn--'));
  const valid = domain.split('.').every(written) && ascii.split('.').every((label) => fits(label) && label.length <= 63);
  return valid ? ascii : undefined;
}

/**
 * Watches DATA for a CR not followed by LF or an LF not preceded by CR — the ambiguity that SMTP
 * smuggling exploits (`\n.\n`, `\r.\r`, ...). State carries across chunk boundaries.
 */
export class BareLineEndingScanner {
  private previousCr = false;
  found = false;

  scan(chunk: Buffer): void {
    if (this.found || chunk.length === 0) return;
    // every LF must follow a CR
    for (let i = chunk.indexOf(10); i !== -1; i = chunk.indexOf(10, i + 1)) {
      const before = i === 0 ? this.previousCr : chunk[i - 1] === 13;
      if (!before) {
        this.found = true;
        return;
      }
    }
    // every CR must precede an LF (a CR at the end of a chunk is decided by the next one)
    if (this.previousCr && chunk[0] !== 10) {
      this.found = true;
      return;
    }
    for (let i = chunk.indexOf(13); i !== -1 && i < chunk.length - 1; i = chunk.indexOf(13, i + 1)) {
      if (chunk[i + 1] !== 10) {
        this.found = true;
        return;
      }
    }
    this.previousCr = chunk[chunk.length - 1] === 13;
  }

  /** A message may not end in a lone CR either. */
  finish(): boolean {
    if (this.previousCr) this.found = true;
    return this.found;
  }
}

/**
 * A message may carry at most this many `Received:` header fields, relayq's own included: more
 * means a mail loop (RFC 5321 §6.3), e.g. a forwardHost that leads back to this relay. Postfix's
 * hopcount_limit, with its default.
 */
export const MAX_RECEIVED_HEADERS = 50;

/**
 * Counts the `Received:` header fields of a message as its bytes arrive (CRLF lines, as the
 * bare-line-ending scan makes sure), up to the empty line that ends the header section. A field
 * name may be followed by spaces or tabs before its colon (RFC 5322 §4.5's obsolete syntax, which
 * Postfix's hop count also takes). Only the start of a line is looked at.
 */
export class ReceivedHeaderCounter {
  count = 0;
  /**
   * The message's first line starts with a space or tab: after relayq's header it would read as
   * that header's continuation, so relayq's header is followed by an empty line (as Postfix's
   * cleanup does for a header section that begins with no field) and the line stays in the body.
   */
  startsFolded = false;
  private started = false;
  private ended = false;
  /** Where the current line is: in its first 8 bytes, after `received`, or past what counts. */
  private state: 'name' | 'colon' | 'rest' = 'name';
  /** The first bytes of the current line, up to the 8 of `received`. */
  private start = '';

  scan(chunk: Buffer): void {
    if (!this.started && chunk.length > 0) {
      this.started = true;
      this.startsFolded = chunk[0] === 32 || chunk[0] === 9;
      // then the message has no header section: its lines all follow relayq's empty line
      if (this.startsFolded) this.ended = true;
    }
    let i = 0;
    while (!this.ended && i < chunk.length) {
      if (this.state === 'rest') {
        const lf = chunk.indexOf(10, i);
        if (lf === -1) return;
        i = lf;
      }
      const b = chunk[i++];
      if (b === 10) {
        if (this.start === '\r') this.ended = true; // the empty line
        this.state = 'name';
        this.start = '';
      } else if (this.state === 'colon') {
        if (b === 58) this.count++; // ':'
        if (b !== 32 && b !== 9) this.state = 'rest';
      } else {
        this.start += String.fromCharCode(b);
        if (this.start.length === 8) this.state = this.start.toLowerCase() === 'received' ? 'colon' : 'rest';
      }
    }
  }
}

export interface ReceivedInfo {
  helo: string | null;
  clientIp: string;
  serverName: string;
  protocol: string;
  queueId: string;
  recipients: readonly string[];
  now: number;
  /** An empty line after the header, so that a first line starting with a space or tab does not continue it. */
  endHeaderSection?: boolean;
}

/**
 * RFC 5321 §4.4 trace header; `for` is given only for a single recipient. The comment after
 * `from` has the client's address only: relayq does no reverse lookup.
 */
export function receivedHeader(info: ReceivedInfo): Buffer {
  const from = info.helo || info.clientIp;
  // an address literal: IPv6 ones carry the "IPv6:" tag (RFC 5321 section 4.1.3)
  const literal = info.clientIp.includes(':') ? `IPv6:${info.clientIp}` : info.clientIp;
  const forPart = info.recipients.length === 1 ? `\r\n\tfor <${traceAddress(info.recipients[0])}>` : '';
  return Buffer.from(
    `Received: from ${sanitize(from)} ([${literal}])\r\n\tby ${info.serverName} (relayq) with ${info.protocol} id ${info.queueId}${forPart};\r\n\t${rfc5322Date(info.now)}\r\n${info.endHeaderSection ? '\r\n' : ''}`,
  );
}

/**
 * The address as the header may carry it: smtp-server hands over a punycode domain decoded
 * (`user@xn--mnchen-3ya.de` arrives as `user@münchen.de`), and relayq forwards domains in ASCII.
 * The header does the same, so that it adds no UTF-8 to a message that carries none: an ASCII
 * envelope goes upstream without SMTPUTF8. Only a UTF-8 local part stays, and it needs SMTPUTF8
 * of its own.
 */
function traceAddress(address: string): string {
  const at = address.lastIndexOf('@');
  if (at < 0 || isAscii(address)) return address;
  return `${address.slice(0, at)}@${domainToAscii(address.slice(at + 1)) || sanitize(address.slice(at + 1))}`;
}

/** Text for a Received: field: ASCII, and no `(`, `)` or `;`, which would end its comment or its clauses. */
function sanitize(text: string): string {
  return text.replace(/[^\x21-\x7e ]/g, '?').replace(/[();]/g, '?');
}

const DAYS = ['Sun', 'Mon', 'Tue', 'Wed', 'Thu', 'Fri', 'Sat'];
const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];

function rfc5322Date(ms: number): string {
  const d = new Date(ms);
  const pad = (n: number) => String(n).padStart(2, '0');
  return `${DAYS[d.getUTCDay()]}, ${d.getUTCDate()} ${MONTHS[d.getUTCMonth()]} ${d.getUTCFullYear()} ${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}:${pad(d.getUTCSeconds())} +0000`;
}

/** The Subject of a message (first header block only), for logs when logAllEmails is on. */
export function subjectOf(raw: Buffer): string | undefined {
  const end = raw.indexOf('\r\n\r\n');
  const head = raw.subarray(0, end === -1 ? Math.min(raw.length, 65536) : end).toString('utf8');
  // lines end at CRLF only: a U+2028 in another header is no line start (`X-Note: a\u2028Subject: …`)
  const match = /(?:^|\r\n)Subject:[ \t]*([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)/i.exec(head);
  return match ? match[1].replace(/\r\n[ \t]/g, ' ').slice(0, 200) : undefined;
}
