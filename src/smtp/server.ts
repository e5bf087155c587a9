// relayq's listener: smtp-server with these documented changes to its connection handling.
// 1. No 100 ms "early talker" pause before the greeting. smtp-server hard-codes it in
//    SMTPConnection.init(); it caps one-message-per-connection clients at ~10 messages/s per
//    connection. relayq serves applications on trusted networks, not the open Internet.
// 2. Replies whose text starts with an enhanced status code ("4.7.1 ...") are sent with that
//    code instead of the one smtp-server derives from the basic code, and smtp-server's own
//    replies that the spec gives another enhanced code are mapped here, in one table. LHLO, an
//    unknown command to an SMTP server, gets its refusal's code as any other unknown command
//    does (smtp-server leaves it out, as RFC 2034 has it for the replies to HELO and EHLO).
// 3. AUTH before TLS only where the policy allows it (relayq: loopback clients). Other sessions
//    are not offered AUTH in the EHLO reply, and an AUTH command gets `538 5.7.11` at once,
//    before the client has sent a credential (smtp-server would run the SASL exchange first).
//    AUTH inside a mail transaction gets `503 5.5.1` (RFC 4954 §4); smtp-server took it.
// 4. The commands that follow a message run once its commit has answered, through the parser's
//    continue(). smtp-server's clears the saved continuation after running it, so when those
//    commands end another message at once (a client that sends whole messages without waiting
//    for `354`), that message's continuation was wiped and the connection stalled until its
//    timeout. relayq's parsers (one more after STARTTLS) clear it first.
// 5. The EHLO/HELO name keeps the case the client sent, for `Received:` and the stored `helo`
//    (smtp-server lower-cases it; Postfix records it as sent).
// 6. Every reply of 400 and above, smtp-server's own included, is reported to the server's
//    `onRefusal`, so that the session's closing log line can list what was refused.
// 7. After an AUTH that was refused (relayq's 538 and 503, smtp-server's 503 and 504) the client
//    may still send its credentials (the base64 lines of LOGIN, a PLAIN response), also after
//    cancelling one with `*`: so after any AUTH every line up to the next SMTP command is logged
//    masked at debug, as smtp-server masks the lines of an AUTH exchange. A line that starts with
//    AUTH but that smtp-server does not read as one (`AUTH<tab>PLAIN`, ` AUTH`, `AUTH=`: `500`) is
//    logged as `AUTH /* secured */`, and the lines after it are masked the same way. Of an AUTH
//    line itself only the word AUTH and a mechanism's name are logged: `AUTH <base64>` (no
//    mechanism, `504`) is logged as `AUTH /* secured */`. A line that is no command at all is
//    logged by its length only: it is most often a message sent behind a refused DATA.
// 8. A client that shuts down its sending side after its last command (`nc -N`, a script that
//    half-closes after `.` or QUIT) still gets the replies to what it sent, as Postfix gives
//    them: the listener keeps the socket half-open (intake sets `allowHalfOpen`), replies are
//    written while the socket can still be written (smtp-server writes only while both sides
//    are open, so a message stored after the client's FIN went unanswered and was then sent
//    again), and the connection closes once every command it sent has been answered. During a
//    STARTTLS handshake there is no parser to end, so a FIN then ends the connection.
//    `inputAhead(session)` tells the handlers whether the client has sent more than the
//    command being answered (more input, or its FIN): such a client may never read the answer.
// 9. A DATA that is refused (no recipient was accepted, no EHLO yet, or it has an argument:
//    `501 5.5.4`, as Postfix answers) while the client has already sent more: that is the
//    message of a client that did not wait for the `354`, and its lines would run as commands
//    (a `RCPT TO:` in a body would become another message's envelope). The refusal is followed
//    by `421 4.5.0` and the connection is closed, with nothing of what followed read as commands.
// 10. Out-of-order commands are answered as Postfix does: RCPT or DATA with no MAIL gets `503 need
//    MAIL command` (smtp-server checked RCPT's address first, and asked DATA for RCPT), and EXPN,
//    a command of RFC 5321 that relayq does not implement, gets `502` (smtp-server: unknown, `500`),
//    and so does STARTTLS with no `tls.*` set. MAIL without `FROM:` gets `501 5.5.4 Syntax: MAIL
//    FROM:<address>`, RCPT without `TO:` its like (smtp-server: `Bad sender address syntax`,
//    which relayq gives `5.1.3`, for an address it cannot read).
// 11. AUTH data that is not base64 (an initial response, or a line of the exchange) gets `501
//    5.5.2` and ends the exchange (RFC 4954 §4): smtp-server decodes it leniently, skipping the
//    characters that are none, so `!AGFwcAB…=!!` logged in as the user that the rest spells.
// 12. A MAIL parameter repeated with the same value (`SMTPUTF8 SMTPUTF8`, `BODY=8BITMIME` twice,
//    what Python's smtplib sends when its caller asked for them too) is taken once, as Postfix
//    takes it; smtp-server refuses any repeat (`501 5.5.4 Error: duplicate … parameter`). A repeat
//    with another value, and any repeated DSN parameter (RFC 3461 §4), is still refused so.
// And one change to how replies are written: the replies a connection produces in one pass over
// its input (MAIL, RCPT and DATA of a pipelining client) leave in one write instead of one each;
// the socket is corked until the current tick's work is done. A `220` (greeting, STARTTLS) is
// written at once, because a TLS upgrade takes the socket over right after it.
import type net from 'node:net';
import type tls from 'node:tls';
import { SMTPServer, type SMTPServerOptions, type SMTPServerSession } from 'smtp-server';
import { SMTPConnection } from 'smtp-server/lib/smtp-connection.js';
import type { SMTPStream } from 'smtp-server/lib/smtp-stream.js';

const ENHANCED = /^[245]\.\d{1,3}\.\d{1,3} /;

/** Commands smtp-server knows: a line after a refused AUTH that is none of these may be a credential. */
const COMMANDS = new Set(['HELO', 'EHLO', 'LHLO', 'MAIL', 'RCPT', 'DATA', 'RSET', 'NOOP', 'QUIT', 'VRFY', 'EXPN', 'HELP', 'STARTTLS', 'AUTH', 'BDAT', 'XCLIENT', 'XFORWARD']);

/** Mechanisms an AUTH line may name in the log; any other word there may be a credential. */
const SASL_MECHANISMS = /^(PLAIN|LOGIN|CRAM-MD5|XOAUTH2|OAUTHBEARER|SCRAM-SHA-1|SCRAM-SHA-256|GSSAPI|NTLM|EXTERNAL|ANONYMOUS)$/i;

/** smtp-server's own masking of AUTH lines, which RelayqConnection extends (module comment, 7). */
const redactCredentials = (SMTPConnection.prototype as unknown as { _redactCredentials(commandName: string, line: string): { commandName: string; line: string } })
  ._redactCredentials;

/** MAIL parameters that may come twice with the same value (module comment, 12). */
const REPEATABLE = new Set(['SIZE', 'BODY', 'SMTPUTF8']);

/** The first parameter of a MAIL line that is repeated with another value, or may not be repeated at all. */
function conflictingRepeat(line: string): string | undefined {
  // the parameters follow the path, as smtp-server splits them
  const parameters = line.split(':').slice(1).join(':').trim().split(/\s+/).slice(1);
  const seen = new Map<string, string>();
  for (const parameter of parameters) {
    const [name, ...value] = parameter.split('=');
    const key = name.toUpperCase();
    if (!key) continue;
    const upper = value.join('=').toUpperCase();
    if (seen.has(key) && (!REPEATABLE.has(key) || seen.get(key) !== upper)) return key;
    seen.set(key, upper);
  }
  return undefined;
}

/** Base64 as RFC 4648 writes it; the padding may be left out, as some clients do. */
const BASE64 = /^[A-Za-z0-9+/]*={0,2}$/;

/** A SASL response that is not base64 (module comment, 11); `*` (cancel) and `=` (empty) are no data. */
function notBase64(response: string): boolean {
  return response !== '*' && response !== '=' && (!BASE64.test(response) || response.replace(/=+$/, '').length % 4 === 1);
}

/** smtp-server's own replies that the spec gives another enhanced code. */
const OWN_REPLIES: Array<[number, RegExp, string]> = [
  [421, /shutting down/i, '4.3.2'],
  [501, /address syntax/i, '5.1.3'],
];

/** SMTPStream.continue(), with the saved continuation cleared before it runs (module comment, 4). */
function continueClearedFirst(this: SMTPStream): void {
  const next = this._continueCallback;
  if (typeof next === 'function') {
    this._continueCallback = false;
    next();
  } else {
    this._continueCallback = true; // continue() came before the message's end: run it then
  }
}

/** The connection of each session, for the questions intake asks about it (module comment, 8). */
const connections = new WeakMap<SMTPServerSession, RelayqConnection>();

/**
 * The client of this session has sent its FIN, or more input than the parser takes while it
 * waits for the current command's answer: the socket then stops reading, and a FIN waits unread.
 */
export function inputAhead(session: SMTPServerSession): boolean {
  return connections.get(session)?.inputAhead() ?? false;
}

/**
 * Calls `ended` once the client of this session has shut down its sending side (its FIN read;
 * soon after this call if it has been already) with nothing sent after the command being
 * answered; returns what stops the watch. A client that sent more (a pipelined transaction) is
 * still there for its replies, and so is not `ended`.
 */
export function whenInputEnds(session: SMTPServerSession, ended: () => void): () => void {
  return connections.get(session)?.whenInputEnds(ended) ?? (() => {});
}

/** STARTTLS was answered and no TLS session followed: at the end, a client that never started it, or failed. */
export function tlsNotCompleted(session: SMTPServerSession): boolean {
  return connections.get(session)?.tlsPending ?? false;
}

class RelayqConnection extends SMTPConnection {
  override init(): void {
    connections.set(this.session, this);
    this._setListeners(() => {
      const { maxClients } = this._server.options;
      if (maxClients && this._server.connections.size > maxClients) {
        // smtp-server fills the session in only for a connection it serves; the log line needs this
        this.session.remoteAddress = this.remoteAddress;
        this.relayq.onConnectionLimit(this.session);
        this.send(421, '4.7.0 Too many connections, try again later');
        return;
      }
      this.connectionReady();
    });
  }

  /** See inputAhead; the socket and parser of the moment: those of the TLS session after STARTTLS. */
  inputAhead(): boolean {
    const socket = this._socket;
    return socket.readableEnded || socket.readableLength > 0 || (this._parser ? this._parser.writableNeedDrain : false);
  }

  /** See whenInputEnds. */
  whenInputEnds(ended: () => void): () => void {
    const socket = this._socket;
    const onEnd = () => {
      if (!this.sentAhead()) ended();
    };
    if (socket.readableEnded) {
      queueMicrotask(onEnd);
      return () => {};
    }
    socket.once('end', onEnd);
    return () => socket.off('end', onEnd);
  }

  /** STARTTLS was answered `220` and its handshake has not completed (yet). */
  tlsPending = false;

  override _createParser(): SMTPStream {
    const parser = super._createParser();
    parser.continue = continueClearedFirst;
    // where in its input the parser is (module comment, 9): each command line ends at a LF. The
    // parser also writes to itself, the rest of a chunk after a message's final dot: its input
    // is then part of the chunk the socket gave, which stays counted until all of it is read.
    const write = parser._write;
    parser._write = (chunk, encoding, next) => {
      if (this.socketChunk === 0) {
        this.socketChunk = chunk.length;
        const done = next;
        next = (err) => {
          this.socketChunk = 0;
          done(err);
        };
      }
      this.commandChunk = parser._dataMode ? null : chunk;
      this.nextLine = 0;
      write.call(parser, chunk, encoding, next);
    };
    const oncommand = parser.oncommand;
    parser.oncommand = (command, callback) => {
      const chunk = this.commandChunk;
      if (chunk) this.nextLine = chunk.indexOf(0x0a, this.nextLine) + 1 || chunk.length;
      oncommand.call(parser, command, callback);
    };
    // the client's input has ended and every command in it has been answered (module comment, 8)
    parser.once('finish', () => this.close());
    return parser;
  }

  /**
   * A TLS socket takes allowHalfOpen from the socket it wraps. Until the handshake is done no
   * parser reads, so a client's FIN must end the connection (module comment, 8).
   */
  override upgrade(callback: () => void, secureCallback?: () => void): void {
    this._socket.allowHalfOpen = false;
    this.tlsPending = true;
    super.upgrade(callback, () => {
      this.tlsPending = false;
      this._socket.allowHalfOpen = true;
      this.acceptedOpening = false; // as smtp-server forgets the greeting (RFC 3207 §4.2)
      secureCallback?.();
    });
  }

  private corked = false;
  /** The input the parser reads command lines from, and where the line after the current one starts. */
  private commandChunk: Buffer | null = null;
  private nextLine = 0;
  /** The length of the chunk of the socket the parser is reading (0: none); what it writes to itself is part of it. */
  private socketChunk = 0;
  /** Whether lines are masked until the next command, after an AUTH (module comment, 7). */
  private afterAuth = false;

  _redactCredentials(commandName: string, line: string): { commandName: string; line: string } {
    if (this.afterAuth && !COMMANDS.has(commandName)) return { commandName: 'AUTH', line: '/* secured */' };
    // smtp-server names a command by what precedes its first space: `AUTH\tPLAIN …`, ` AUTH …`
    // and `AUTH=PLAIN …` are no AUTH to it (500), and all that follows the word is masked
    if (commandName !== 'AUTH' && /^[\s\0]*AUTH(?![A-Za-z0-9_-])/i.test(line)) {
      this.afterAuth = true;
      return { commandName: 'AUTH', line: 'AUTH /* secured */' };
    }
    this.afterAuth = commandName === 'AUTH';
    // a line that is no command is most often a message sent behind a refused DATA (a client that
    // did not wait for the 354): its content, which logAllEmails=false keeps out of the logs
    if (!this._nextHandler && !COMMANDS.has(commandName)) return { commandName: 'UNKNOWN', line: `/* not a command: ${Buffer.byteLength(line)} bytes */` };
    if (commandName !== 'AUTH' || this._nextHandler) return redactCredentials.call(this, commandName, line);
    // smtp-server keeps the word after AUTH, which is a credential when the client left out the
    // mechanism (`AUTH <base64>`, answered 504): only a mechanism name is logged as it was sent
    const [, mechanism, ...response] = line.trim().split(/\s+/);
    if (mechanism === undefined) return { commandName, line: 'AUTH' };
    if (!SASL_MECHANISMS.test(mechanism)) return { commandName, line: 'AUTH /* secured */' };
    return { commandName, line: response.length > 0 ? `AUTH ${mechanism} /* secured */` : `AUTH ${mechanism}` };
  }

  override send(code: number, data?: string | string[] | null, context?: string | false): void {
    const socket = this._socket;
    if (socket.readyState === 'writeOnly') stillOpenForReplies(socket);
    if (code === 220) this.uncork(socket);
    else if (!this.corked && socket.writable) {
      this.corked = true;
      socket.cork();
      process.nextTick(() => this.uncork(socket));
    }
    // the EHLO reply (the only multi-line 250) offers AUTH only to sessions that may use it
    if (code === 250 && Array.isArray(data) && !this.authOffered()) data = data.filter((line) => !/^AUTH\b/i.test(line));
    // smtp-server writes a reply only to an open socket outside a TLS handshake: one to a client
    // that is gone (a reset in the middle of DATA) or mid-handshake reaches nobody
    const reaches = !this._upgrading && !socket.destroyed && socket.readyState === 'open';
    super.send(code, ...withEnhancedCode(code, data, context));
    // smtp-server keeps the last such reply, as sent, in session.error
    if (code >= 400 && reaches) this.relayq.onRefusal(this.session, String(this.session.error));
  }

  override handler_AUTH(command: Buffer, callback: () => void): void {
    if (!this.relayq.authEnabled) {
      // no credentials configured: AUTH is not offered, and answered as Postfix answers it
      this.answer(503, '5.5.1 Error: authentication not enabled', callback);
    } else if (this.session.envelope.mailFrom) {
      this.answer(503, '5.5.1 Error: MAIL transaction in progress', callback);
    } else if (this.authNeedsTls()) {
      this.answer(538, '5.7.11 Encryption required for requested authentication mechanism', callback);
    } else if (notBase64(command.toString().trim().split(/\s+/)[2] ?? '')) {
      this.answer(501, '5.5.2 Invalid base64 data in the initial response', callback);
    } else {
      super.handler_AUTH(command, callback);
    }
  }

  /** A repeated MAIL parameter that is harmless is no duplicate (module comment, 12). */
  override _parseAddressCommand(rawName: string, rawCommand: Buffer | string): ReturnType<SMTPConnection['_parseAddressCommand']> {
    const parsed = super._parseAddressCommand(rawName, rawCommand);
    if (parsed !== false && parsed.duplicate && rawName === 'mail from') {
      const conflict = conflictingRepeat(rawCommand.toString());
      if (conflict) parsed.duplicate = conflict;
      else delete parsed.duplicate;
    }
    return parsed;
  }

  /**
   * REQUIRETLS (RFC 8689) is not offered (intake hides it): smtp-server's check of it is skipped,
   * so that its parameter gets relayq's `555` of any other unknown one, in the same order of
   * checks. smtp-server would answer it without TLS with a `530`, which reads as "authentication
   * required".
   */
  override _validateMailParams(parsed: Parameters<SMTPConnection['_validateMailParams']>[0]): ReturnType<SMTPConnection['_validateMailParams']> {
    const { REQUIRETLS: _, ...args } = parsed.args || {};
    const refusal = super._validateMailParams({ ...parsed, args });
    // the SIZE declared is over the limit: refused here, before onMailFrom
    if (refusal?.code === 552) this.relayq.onSizeRefused(this.session, parsed.address, Number(args.SIZE));
    return refusal;
  }

  /** With no transaction open, `503 need MAIL command` is answered and true returned. */
  private refusedWithoutMail(callback: () => void): boolean {
    if (this.session.envelope.mailFrom) return false;
    this.answer(503, 'Error: need MAIL command', callback);
    return true;
  }

  /** MAIL without `FROM:` is a syntax error, not a bad address (module comment, 10). */
  override handler_MAIL(command: Buffer, callback: () => void): void {
    if (!this.refusedSyntax(command, 'MAIL FROM', callback)) super.handler_MAIL(command, callback);
  }

  /** RCPT outside a transaction is out of order, whatever its address: smtp-server checked the address first. */
  override handler_RCPT(command: Buffer, callback: () => void): void {
    if (!this.refusedWithoutMail(callback) && !this.refusedSyntax(command, 'RCPT TO', callback)) super.handler_RCPT(command, callback);
  }

  /** Answers `501 5.5.4` when the command does not start with `name:` as smtp-server reads it; true if it did. */
  private refusedSyntax(command: Buffer, name: string, callback: () => void): boolean {
    const [given, ...rest] = command.toString().split(':');
    if (rest.length > 0 && given.trim().toUpperCase() === name) return false;
    this.answer(501, `5.5.4 Syntax: ${name}:<address>`, callback);
    return true;
  }

  /**
   * DATA takes no argument: `501 5.5.4`, as Postfix answers (smtp-server started a message). With
   * no transaction open, MAIL is what is missing (smtp-server asks for RCPT).
   */
  override handler_DATA(command: Buffer, callback: () => void): void {
    if (this.refusedWithoutMail(callback)) return;
    if (this.session.envelope.rcptTo.length > 0 && command.toString().trim().length > 'DATA'.length) {
      this.answer(501, '5.5.4 Syntax: DATA', callback);
      return;
    }
    super.handler_DATA(command, callback);
  }

  /** EXPN is a command of RFC 5321 that relayq does not implement (502), not an unknown one (500, counted towards smtp-server's limit). */
  handler_EXPN(_command: Buffer, callback: () => void): void {
    this.answer(502, 'Error: EXPN not implemented', callback);
  }

  /** VRFY verifies nothing: RFC 5321 §3.5.3's `252` with its wording (smtp-server: `2.1.5`, "No promises though"). */
  override handler_VRFY(command: Buffer, callback: () => void): void {
    if (!command.toString().trim().split(/\s+/)[1]) {
      super.handler_VRFY(command, callback); // `501 Syntax: VRFY address`
      return;
    }
    this.answer(252, '2.0.0 Cannot VRFY user, but will accept message and attempt delivery', callback);
  }

  /**
   * Before smtp-server reads a command: a line of an AUTH exchange that is not base64 (module
   * comment, 11) and STARTTLS with no `tls.*` set (10) are answered here; a DATA that did not
   * start a message, whoever refused it (handler_DATA, or smtp-server before an EHLO), with input
   * behind it gets `421`, which closes the connection (9).
   */
  override _onCommand(command: Buffer, callback?: () => void): void {
    if (this._nextHandler && notBase64(command.toString().trim())) {
      // a line of an AUTH exchange (module comment, 11)
      this._nextHandler = false;
      this.answer(501, '5.5.2 Invalid base64 data in the authentication exchange', callback);
      return;
    }
    if (!this._nextHandler && /^STARTTLS\b/i.test(command.toString()) && !this._isSupported('STARTTLS')) {
      // with no tls.* set, as Postfix without TLS answers it (smtp-server: an unknown command)
      this.answer(502, '5.5.1 Error: command not implemented', callback);
      return;
    }
    // a DATA with anything after its name, such as a NUL (smtp-server: "command not recognized"), is a DATA too
    const data = !this._nextHandler && /^DATA\b/i.test(command.toString());
    super._onCommand(command, callback);
    const parser = this._parser;
    if (data && parser && !parser._dataMode && !parser.isClosed && !this._upgrading && this.sentAhead()) {
      this.send(421, '4.5.0 Error: message content sent before the reply to DATA, closing connection');
    }
  }

  /**
   * Whether the client has sent anything after the command being answered (its FIN aside).
   * Unlike inputAhead (module comment, 8), it counts the rest of the chunk being read too.
   */
  private sentAhead(): boolean {
    const inChunk = this.commandChunk ? this.commandChunk.length : 0;
    // the rest of this chunk, what the socket has not handed over, the chunks queued behind this one
    return this.nextLine < inChunk || this._socket.readableLength > 0 || (this._parser ? this._parser.writableLength > this.socketChunk : false);
  }

  override handler_EHLO(command: Buffer, callback: () => void): void {
    super.handler_EHLO(command, () => this.keepHeloCase(command, callback));
  }

  override handler_HELO(command: Buffer, callback: () => void): void {
    super.handler_HELO(command, () => this.keepHeloCase(command, callback));
  }

  /** The EHLO or HELO the session was last greeted with; false before one (and after STARTTLS). */
  private acceptedOpening: string | false = false;

  /**
   * After an EHLO/HELO: the name as the client wrote it (module comment, 5). smtp-server takes the
   * command as the session's opening one before it checks it, so a refused one (`HELO` without a
   * name) would have the next message's `Received:` say `SMTP` after an `EHLO`: it is put back.
   */
  private keepHeloCase(command: Buffer, callback: () => void): void {
    const [, name, extra] = command.toString().trim().split(/\s+/);
    const self = this as unknown as { hostNameAppearsAs: string | false };
    // accepted: one name, now the session's (a refused EHLO leaves the earlier name as it was)
    if (name && extra === undefined && self.hostNameAppearsAs === name.toLowerCase()) {
      self.hostNameAppearsAs = name;
      this.session.hostNameAppearsAs = name;
      this.acceptedOpening = this.openingCommand;
    } else {
      this.openingCommand = this.acceptedOpening;
    }
    callback();
  }

  /** Sends a reply of relayq's own and hands the parser its next command. */
  private answer(code: number, text: string, callback?: () => void): void {
    this.send(code, text);
    callback?.();
  }

  private get relayq(): RelayqListenerOptions {
    return (this._server as RelayqSmtpServer).relayq;
  }

  /** Whether the EHLO reply offers AUTH: there are credentials to check, and no TLS is needed first. */
  private authOffered(): boolean {
    return this.relayq.authEnabled && !this.authNeedsTls();
  }

  private authNeedsTls(): boolean {
    return !this.secure && !this.relayq.plaintextAuth(this.session);
  }

  private uncork(socket: net.Socket): void {
    if (!this.corked) return;
    this.corked = false;
    socket.uncork();
  }
}

/**
 * smtp-server writes a reply only while the socket's readyState is 'open', which ends with the
 * client's FIN; the replies of a client that half-closed are written as long as the socket can
 * be written (module comment, 8).
 */
function stillOpenForReplies(socket: net.Socket): void {
  Object.defineProperty(socket, 'readyState', { get: () => (socket.writable ? 'open' : 'closed') });
}

/** The text and context smtp-server should send for a reply (see the module comment). */
function withEnhancedCode(code: number, data: string | string[] | null | undefined, context: string | false | undefined) {
  if (typeof data === 'string' && (code >= 400 || code === 250 || code === 252)) {
    if (ENHANCED.test(data)) return [data, false] as const;
    const own = OWN_REPLIES.find(([c, pattern]) => c === code && pattern.test(data));
    // `Error: Bad sender address syntax` reads as relayq's own `Bad sender address syntax`
    if (own) return [`${own[2]} ${data.replace(/^Error: /, '')}`, false] as const;
  }
  return [data, context === 'LHLO' ? undefined : context] as const;
}

/** What relayq's listener adds to smtp-server's options. */
export interface RelayqListenerOptions {
  /** May this session authenticate before TLS. */
  plaintextAuth: (session: SMTPServerSession) => boolean;
  /** A reply of 400 or above was sent in this session (module comment, 6). */
  onRefusal: (session: SMTPServerSession, reply: string) => void;
  /** MAIL FROM declared a SIZE over the limit, and got `552` without reaching onMailFrom. */
  onSizeRefused: (session: SMTPServerSession, sender: string, declared: number) => void;
  /** A connection over maxClients, about to get `421 4.7.0` and be closed. */
  onConnectionLimit: (session: SMTPServerSession) => void;
  /**
   * False when there are no credentials to check: AUTH is then neither offered nor taken
   * (smtp-server itself always offers its `authMethods`).
   */
  authEnabled: boolean;
}

export class RelayqSmtpServer extends SMTPServer {
  constructor(
    options: SMTPServerOptions,
    readonly relayq: RelayqListenerOptions,
  ) {
    super(options);
  }

  override connect(socket: net.Socket | tls.TLSSocket, socketOptions?: ConstructorParameters<typeof SMTPConnection>[2]): void {
    const connection = new RelayqConnection(this, socket, socketOptions);
    this.connections.add(connection);
    connection.on('error', (err: Error) => this._onError(err));
    connection.on('connect', (data) => this._onClientConnect(data));
    connection.init();
  }
}
