// Every use relayq makes of nodemailer's private SMTPConnection members, in one place: what it
// reads there (the upstream's SIZE and extensions, the socket, the RCPT replies so far) and the
// hooks it sets on the session's steps. Each falls back to nodemailer's own behaviour when the
// member is missing.
import type net from 'node:net';
import type { Readable } from 'node:stream';
import type tls from 'node:tls';
import type SMTPConnection from 'nodemailer/lib/smtp-connection';

/** The upstream's SIZE limit as nodemailer read it from the EHLO reply; 0 when none is given. */
export function sizeLimit(connection: SMTPConnection): number {
  return (connection as unknown as { _maxAllowedSize?: number })._maxAllowedSize ?? 0;
}

/**
 * The reply to DATA must be `354` (RFC 5321 §4.1.1.4; Postfix checks for a 3xx, and so does
 * this); nodemailer also goes ahead on a 2xx, for servers said to send `250` there. A 2xx there
 * mostly means that the replies are out of step with the commands (an upstream that sent one
 * line too many, such as a second greeting line): the message would go out, the `354` would then
 * be read as the reply to the final dot, and every retry would deliver it again. So the
 * transaction ends before the message is sent, as a temporary failure, and the connection is
 * closed. The hook is nodemailer's private `_actionDATA`; without it nothing changes.
 */
export function requireGoAheadForData(connection: SMTPConnection): void {
  type Callback = (err: Error | null, info?: unknown) => void;
  const internals = connection as unknown as { _actionDATA?: (reply: string, callback: Callback) => void };
  const action = internals._actionDATA;
  if (typeof action !== 'function') return;
  internals._actionDATA = function (this: unknown, reply: string, callback: Callback) {
    action.call(this, reply, (err, info) => {
      if (err || reply.startsWith('3')) return callback(err, info);
      const message = `the upstream answered DATA with "${reply.slice(0, 200)}" instead of 354: its replies are out of step with the commands`;
      callback(Object.assign(new Error(message), { code: 'EPROTOCOL' }));
    });
  };
}

/**
 * The reply to EHLO or HELO must be `250` (RFC 5321 §4.3.2); nodemailer takes any 2xx. Another
 * 2xx there (a second `220` greeting line) means that every later reply is one out of step with
 * its command, and a refusal of one RCPT would be read as another's: the connection fails
 * (EPROTOCOL, temporary) before a transaction starts. The hooks are nodemailer's private
 * `_actionEHLO` and `_actionHELO`; without them nothing changes.
 */
export function requireHelloReply(connection: SMTPConnection): void {
  const internals = connection as unknown as Record<string, unknown> & { _onError(err: Error, type: string): void };
  for (const [name, command] of [['_actionEHLO', 'EHLO'], ['_actionHELO', 'HELO']] as const) {
    const action = internals[name];
    if (typeof action !== 'function') continue;
    internals[name] = function (this: typeof internals, reply: string) {
      if (!reply.startsWith('2') || reply.startsWith('250')) return action.call(this, reply);
      const message = `the upstream answered ${command} with "${reply.slice(0, 200)}" instead of 250: its replies are out of step with the commands`;
      this._onError(new Error(message), 'EPROTOCOL');
    };
  }
}

/**
 * Calls `refused` with the upstream's reply when it refuses STARTTLS (`454`), before nodemailer
 * handles it (with opportunisticTLS it goes on in plain text, and says so only in its own log).
 * The hook is nodemailer's private `_actionSTARTTLS`; without it nothing is said.
 */
export function onStartTlsRefused(connection: SMTPConnection, refused: (reply: string) => void): void {
  const internals = connection as unknown as { _actionSTARTTLS?: (reply: string) => void };
  const action = internals._actionSTARTTLS;
  if (typeof action !== 'function') return;
  internals._actionSTARTTLS = function (this: unknown, reply: string) {
    if (!reply.startsWith('2')) refused(reply);
    return action.call(this, reply);
  };
}

/**
 * nodemailer reads the replies that came in one burst one per turn of the event loop, and takes
 * the connection's close as it comes: replies still queued then were lost, and the attempt was
 * "Connection closed unexpectedly" with no code. An upstream that answers a pipelined command
 * with a `421` or a `550` and closes at once (RFC 5321 §3.8; Haraka's DENYDISCONNECT) does just
 * that, and a `550` to one RCPT was then retried as a temporary failure. The close now waits
 * until the queued replies are read, as long as each turn reads one. Meanwhile the connection is
 * not yet destroyed: a command on it fails at once as on a closed connection (a message is then
 * not sent), and its `end` takes it out of the pool. The hook is nodemailer's private `_onClose`;
 * without it nothing changes.
 */
export function readRepliesBeforeClose(connection: SMTPConnection): void {
  const internals = connection as unknown as { _onClose?: () => void; _responseQueue?: unknown[]; _destroyed?: boolean };
  const onClose = internals._onClose;
  if (typeof onClose !== 'function') return;
  internals._onClose = function (this: typeof internals) {
    let queued = Number.POSITIVE_INFINITY;
    const closeOnceRead = () => {
      const left = this._responseQueue?.length ?? 0;
      // a reply that came only in part stays queued for ever: the close goes ahead
      if (left > 0 && left < queued && !this._destroyed) {
        queued = left;
        setImmediate(closeOnceRead);
      } else {
        onClose.call(this);
      }
    };
    closeOnceRead();
  };
}

/**
 * Adds SMTPUTF8 to the MAIL FROM of a transaction that `wanted` says asks for it, when the
 * upstream offered it. nodemailer adds it only for an address that is not ASCII, so a client's
 * request for a message with UTF-8 in its header fields alone (RFC 6532) would not go on. The
 * hook is nodemailer's private `_sendCommand`; without it, such a message goes out without
 * SMTPUTF8.
 */
export function requestSmtpUtf8(connection: SMTPConnection, wanted: () => boolean): void {
  const internals = connection as unknown as { _sendCommand?: (command: string, logged?: string) => void };
  const send = internals._sendCommand;
  if (typeof send !== 'function') return;
  internals._sendCommand = function (this: unknown, command: string, logged?: string) {
    // the parameters follow the path's `>` (nodemailer takes no `>` in an address)
    const more =
      command.startsWith('MAIL FROM:') && wanted() && offers(connection, 'SMTPUTF8') && !command.slice(command.lastIndexOf('>') + 1).split(' ').includes('SMTPUTF8');
    return send.call(this, more ? `${command} SMTPUTF8` : command, logged);
  };
}

/** Whether the upstream's EHLO reply offered an extension (as nodemailer parsed it). */
export function offers(connection: SMTPConnection, extension: string): boolean {
  return ((connection as unknown as { _supportedExtensions?: string[] })._supportedExtensions ?? []).includes(extension);
}

/** nodemailer's socket of a connection: after STARTTLS, the TLS one. */
export function socketOf(
  connection: SMTPConnection,
): (net.Socket & Partial<Pick<tls.TLSSocket, 'authorized' | 'authorizationError' | 'getProtocol' | 'getPeerCertificate'>>) | undefined {
  return (connection as unknown as { _socket?: net.Socket })._socket;
}

/** Whether nodemailer was in a STARTTLS handshake when the connection failed. */
export function upgrading(connection: SMTPConnection): boolean {
  return (connection as unknown as { upgrading?: boolean }).upgrading === true;
}

/**
 * What nodemailer records of a transaction's replies to MAIL and RCPT, on the envelope object that
 * `send` was given (so it is that transaction's only when it is that object: a send that failed
 * before it set its envelope leaves the previous transaction's there). With PIPELINING, nodemailer
 * decides on them at the reply to DATA; a connection that closes before that one leaves them here.
 */
export function envelopeReplies(connection: SMTPConnection): EnvelopeReplies | undefined {
  return (connection as unknown as { _envelope?: EnvelopeReplies })._envelope;
}

export type EnvelopeReplies = { accepted?: string[]; rejectedErrors?: SMTPConnection.SMTPError[]; mailError?: SMTPConnection.SMTPError };

/**
 * A hook on nodemailer's private `_createSendStream`, called after the `354`, that does two
 * things (a nodemailer without that method loses both, and delivers as before):
 * - It hands each transaction's data stream, which nodemailer does not expose, to `onStream`, so
 *   that a reply can say the upstream may have the message (upstream.ts, `withEndUnanswered`).
 * - It writes each message at once. nodemailer hands a message to the socket in two writes, its
 *   bytes and then the final dot: two TCP segments (TCP_NODELAY) and two reads at the upstream.
 *   The socket is corked here and uncorked when this turn of the event loop is over; the message
 *   is one buffer in memory, so by then both writes are in and leave as one. Anything written
 *   later (a large message waiting for the socket to drain) is written uncorked.
 */
export function hookSendStream(connection: SMTPConnection, onStream: (stream: Readable) => void): void {
  const internals = connection as unknown as { _createSendStream?: (...args: unknown[]) => unknown; _socket?: net.Socket };
  const create = internals._createSendStream;
  if (typeof create !== 'function') return;
  internals._createSendStream = function (this: unknown, ...args: unknown[]) {
    const socket = internals._socket;
    if (socket && !socket.destroyed) {
      socket.cork();
      setImmediate(() => socket.uncork());
    }
    const stream = create.apply(this, args) as Readable;
    onStream(stream);
    return stream;
  };
}
