// The upstream SMTP relay ("smart host"): nodemailer's SMTPConnection on pooled, reused
// connections, the original envelope sender and the stored bytes unchanged. relayq keeps its own
// small pool instead of nodemailer's pooled transport because that transport builds a MIME tree
// for every message, even a raw one (a random boundary and a Message-ID it then does not use);
// on a busy relay that cost about as much CPU as receiving the message. Every timeout is below
// the claim lease, and an attempt that outlives its deadline is aborted (its connection closed),
// so a stalled upstream can never hold a batch past its lease.
import { isAscii as isAsciiBytes } from 'node:buffer';
import { performance } from 'node:perf_hooks';
import { Readable } from 'node:stream';
import type tls from 'node:tls';
import SMTPConnection from 'nodemailer/lib/smtp-connection';
import type { Logger } from 'pino';
import { hostPort, isLoopback } from '../access-control.js';
import { isAscii, normalizeForEnvelope } from '../address.js';
import { MIN_MESSAGE_SIZE_LIMIT } from '../config/schema.js';
import { credentialSecrets, libraryLogger, masker } from '../logger.js';
import type { ClaimedBatch } from '../store/delivery.js';
import {
  hookSendStream,
  offers,
  onStartTlsRefused,
  readRepliesBeforeClose,
  type EnvelopeReplies,
  envelopeReplies,
  requestSmtpUtf8,
  requireGoAheadForData,
  requireHelloReply,
  sizeLimit,
  socketOf,
  upgrading,
} from './nodemailer-internals.js';
import { type BatchResult, classifyUpstreamError, openSslCode, resultFromNodemailer, uniformResult } from './outcomes.js';
import { settleWithin, whenAborted } from './settle.js';

export interface UpstreamSettings {
  host: string;
  port: number;
  /** Implicit TLS (port 465 style); otherwise STARTTLS whenever the upstream offers it. */
  secure: boolean;
  /** Without implicit TLS, an upstream that offers no STARTTLS gets nothing (forwardRequireTLS). */
  requireTls: boolean;
  username: string;
  password: string;
  /** Our name in EHLO. */
  clientName: string;
  /** The whole attempt must end before this; connection-level timeouts are derived from it. */
  attemptTimeoutMs: number;
  logger: Logger;
  /** Extra tls.connect options (a private CA, for instance); see verifiesCertificates. */
  tls?: tls.ConnectionOptions;
  /** Test hook: the upstream's address as the AUTH policy sees it (default: the socket's peer). */
  peerAddress?: (socketAddress: string) => string;
  /** The relay's clock (default Date.now): how old a connection is. */
  now?: () => number;
  /** The largest message relayq accepts (maxMessageSize): an upstream SIZE below it gets a warning. */
  maxMessageSize: number;
  /** The most connections open at once (workerCount: one per attempt in flight). */
  maxConnections: number;
}

/**
 * The message goes to nodemailer in views of this size, none copied. Its dot-stuffing reads each
 * chunk in one go and copies a chunk in which it stuffs a line: a 25 MB message in one chunk
 * held the main thread for about 0.6 s and took 150 MB more memory when its lines started with
 * dots, 0.1 s when none did.
 */
export const MESSAGE_PIECE_BYTES = 64 * 1024;

function* pieces(raw: Uint8Array): Generator<Uint8Array> {
  for (let at = 0; at < raw.length; at += MESSAGE_PIECE_BYTES) yield raw.subarray(at, at + MESSAGE_PIECE_BYTES);
}

/** The envelope of one transaction, as relayq builds it for nodemailer. */
interface Envelope {
  from: string;
  to: string[];
  size: number;
  use8BitMime: boolean;
  /** The client asked for SMTPUTF8: it is asked for upstream too, where offered. */
  smtpUtf8: boolean;
}

/** A transaction, or one recipient of it, the upstream cannot take without SMTPUTF8 (RFC 6531 §3.2). */
function smtpUtf8Refusal(label: string, recipient?: string): UpstreamError {
  const message = `5.6.7 SMTPUTF8 is required, but was not offered by ${label}`;
  return Object.assign(new Error(message), { code: 'EENVELOPE', ownRefusal: true, recipient });
}

/**
 * A message larger than the upstream's SIZE (RFC 1870). nodemailer refuses it before MAIL FROM
 * too, but with no status code; this one says 5.3.4, as Postfix's bounce for it does.
 */
function sizeRefusal(label: string, size: number, limit: number): UpstreamError {
  const message = `5.3.4 message size ${size} exceeds the size limit ${limit} of ${label}`;
  return Object.assign(new Error(message), { code: 'EMESSAGE', ownRefusal: true });
}

/**
 * Room above maxMessageSize for the Received: header relayq adds to a message (usually 150-300
 * bytes; a long HELO, client name or recipient makes it longer).
 */
export const RECEIVED_HEADER_ROOM = 2048;

/** The TLS version of each connection (`TLSv1.3`), or null in plain text: read once it is set up, while its socket is there. */
const tlsVersions = new WeakMap<SMTPConnection, string | null>();

function readTlsVersion(connection: SMTPConnection): string | null {
  if (!connection.secure) return null;
  return socketOf(connection)?.getProtocol?.() ?? 'TLS';
}

function tlsVersion(connection: SMTPConnection): string | null {
  return tlsVersions.get(connection) ?? null;
}

type SendInfo = SMTPConnection.SentMessageInfo & { tls?: string | null };
type UpstreamError = SMTPConnection.SMTPError & {
  /** The TLS version of the connection the transaction failed on (null: plain text). */
  tls?: string | null;
  notSent?: boolean;
  /** The upstream answered a RCPT of the transaction before it failed. */
  answered?: boolean;
  endUnanswered?: boolean;
  rejectedErrors?: SMTPConnection.SMTPError[];
  /** relayq's own refusal before sending (smtpUtf8Refusal, sizeRefusal): its text starts with its enhanced code. */
  ownRefusal?: boolean;
  /** A setting of relayq's and the upstream disagree (BatchResult.settingFault). */
  settingFault?: boolean;
  /** No session could be set up: the upstream could not be reached, or refused the session (see unreachable, refusedSession). */
  unreachable?: boolean;
  /** The connection failed in its STARTTLS handshake (see connect). */
  inHandshake?: boolean;
};

/** nodemailer's codes for a connection that failed at the network: refused, reset, timed out, or a name not resolved. */
const NETWORK_ERROR_CODES = new Set(['ECONNECTION', 'ESOCKET', 'ETIMEDOUT', 'EDNS']);

/**
 * A new connection failed without a reply from the upstream to say why, and not in TLS (a
 * certificate, a port that does not speak it: a setting to fix): refused, timed out before or at
 * the greeting, or closed or reset before a session was set up. Postfix takes such a failure for
 * a dead host.
 */
function unreachable(err: UpstreamError): boolean {
  return NETWORK_ERROR_CODES.has(String(err.code)) && err.responseCode === undefined && err.settingFault !== true && openSslCode(err) === undefined;
}

/**
 * A new connection the upstream refused a session on: its greeting was a refusal (`421`, `554`:
 * Postfix's "host refused to talk to me"), or it refused relayq's login (Postfix's "SASL
 * authentication failed"). Postfix suspends delivery to such a host as to one it cannot reach, and
 * so does relayq: a wrong password is then not tried again for every batch that comes due, which a
 * provider may take for password guessing and answer by locking the account.
 */
function refusedSession(err: UpstreamError): boolean {
  const refusal = typeof err.responseCode === 'number' && err.responseCode >= 400 && err.responseCode < 600;
  return refusal && (err.command === 'CONN' || err.code === 'EAUTH');
}

function abortError(signal: AbortSignal): Error {
  return Object.assign(new Error('Message sending aborted', { cause: signal.reason }), { name: 'AbortError', code: 'EABORT' });
}

/** The connections whose current transaction asks for SMTPUTF8 (Envelope.smtpUtf8). */
const smtpUtf8Transactions = new WeakSet<SMTPConnection>();

/** Each connection's current data stream (the message and its final dot, dot-stuffed), as hookSendStream hands it over. */
const dataStreams = new WeakMap<SMTPConnection, Readable>();

/**
 * Marks an error that ended a transaction after its final dot had left and before any reply to
 * it (the connection closed or timed out, the attempt's deadline): the upstream may have taken
 * the message (RFC 1047), which the stored reply then says. The dot has left when the data
 * stream has ended (its last chunk, the dot, written to the socket) and the socket holds nothing
 * unsent: a large message to an upstream that stopped reading may still sit in its buffer.
 */
function withEndUnanswered(e: UpstreamError, connection: SMTPConnection): void {
  const socket = socketOf(connection);
  const left = dataStreams.get(connection)?.readableEnded === true && socket?.writableLength === 0;
  if (left && typeof e.responseCode !== 'number' && !e.response) e.endUnanswered = true;
}

/**
 * The refusal that replies to a pipelined envelope made before the connection closed, as nodemailer
 * gives it when the reply to DATA comes: the MAIL's, or every recipient's (the first temporary
 * one, else the last, leads). Undefined when a recipient was accepted or not answered.
 */
function refusalBeforeClose(replies: EnvelopeReplies, recipients: number): UpstreamError | undefined {
  if (replies.mailError) return replies.mailError;
  const refused = replies.rejectedErrors ?? [];
  if (replies.accepted?.length || refused.length < recipients) return undefined;
  const lead = refused.find((r) => typeof r.responseCode === 'number' && r.responseCode < 500) ?? refused[refused.length - 1];
  return Object.assign(new Error(`Can't send mail - all recipients were rejected: ${lead.response}`), {
    code: 'EENVELOPE',
    command: 'RCPT TO',
    response: lead.response,
    responseCode: lead.responseCode,
    rejectedErrors: refused,
  });
}

/** The connection ended: the server closed it, or a network error or timeout did. */
function endedConnection(err: UpstreamError): boolean {
  return err.responseCode === 421 || err.code === 'ECONNECTION' || err.code === 'ESOCKET' || err.code === 'ETIMEDOUT';
}

/**
 * A connection is used for new transactions this long after it was opened, then ended with QUIT
 * (Postfix's smtp_connection_reuse_time_limit): a change on the upstream (a reload, another
 * server behind its name) reaches relayq's sessions, and no session piles up errors for ever.
 */
const REUSE_TIME_LIMIT_MS = 300_000;
/** An idle connection says QUIT after this long (Haraka's outbound pool keeps one 50 s). */
const IDLE_QUIT_MS = 30_000;
/** How long a QUIT waits for the upstream's reply before the connection is cut off. */
const QUIT_WAIT_MS = 1000;
/** After the upstream refused a connection beyond those open (atConnectionLimit), one more is tried after this long without such a refusal. */
const LIMIT_RAISE_MS = 60_000;

/** forwardRequireTLS: the message is not sent over a connection that STARTTLS did not secure. */
function tlsRequired(label: string): Error {
  const message = `TLS is required (forwardRequireTLS=true), but ${label} offered no STARTTLS, so nothing was sent; check forwardHost and forwardPort, or a proxy between the upstream and relayq that strips STARTTLS`;
  return settingFault('ETLS', message);
}

/** An error that a setting of relayq's and the upstream's disagree (BatchResult.settingFault). */
function settingFault(code: 'ETLS' | 'EAUTH', message: string): Error {
  return Object.assign(new Error(message), { code, settingFault: true });
}

const PLAINTEXT_AUTH_REFUSED =
  'the upstream offered no TLS (STARTTLS), so forwardUsername/forwardPassword were not sent in plain text; use forwardSSL or an upstream with STARTTLS';

/**
 * Credentials are set, so the upstream is meant to be a submission server; one that offers no
 * AUTH (a port 25 MX by mistake, a man in the middle that strips AUTH and STARTTLS) would get the
 * mail without it, and its refusal (`554 relay access denied`) would fail the mail for good.
 */
const NO_AUTH_OFFERED =
  'forwardUsername is set but the upstream offered no AUTH, so nothing was sent; check forwardHost and forwardPort (a submission port, 587 or 465), or remove the credentials if this upstream takes mail without them';

/**
 * A port that starts with TLS (465) waits for the client's TLS hello while a plain client waits
 * for its `220`: the greeting timeout is all that happens, as with an upstream that hangs, so the
 * reply names both.
 */
function withImplicitTlsHint(err: Error): Error {
  if ((err as { timeoutType?: unknown }).timeoutType !== 'GREETING_TIMEOUT') return err;
  err.message += ': no 220 came: the upstream is hung or overloaded, or its port starts with TLS (as 465 does), which needs forwardSSL=true';
  return err;
}

/**
 * A peer that does not speak TLS where TLS was expected: with forwardSSL, a port that starts in
 * plain text (587, 25); without it, an upstream that offered STARTTLS and then did not answer in
 * TLS (a fault of the upstream, or of something between), where forwardSSL would not help.
 */
function withTlsHint(err: Error, secure: boolean): Error {
  if (openSslCode(err as { code?: unknown }) !== 'ERR_SSL_WRONG_VERSION_NUMBER') return err;
  const hint = secure
    ? 'the upstream did not answer in TLS (with forwardSSL=true its port must start with TLS, as 465 does)'
    : 'the upstream offered STARTTLS, then did not answer in TLS (check the upstream, or a proxy between it and relayq)';
  return Object.assign(err, { hint });
}

/** Node's codes for an upstream certificate that does not verify, by what to check. */
const CERTIFICATE_HINTS: ReadonlyArray<[RegExp, string]> = [
  [
    /^(DEPTH_ZERO_SELF_SIGNED_CERT|SELF_SIGNED_CERT_IN_CHAIN|UNABLE_TO_(VERIFY_LEAF_SIGNATURE|GET_ISSUER_CERT(_LOCALLY)?)|CERT_UNTRUSTED)$/,
    "the upstream's certificate is not signed by a CA that relayq trusts: for a private CA, start relayq with NODE_EXTRA_CA_CERTS naming the CA's PEM file",
  ],
  [/^CERT_(HAS_EXPIRED|NOT_YET_VALID)$/, "the upstream's certificate is out of its dates (or this machine's clock is wrong)"],
  [
    /^ERR_TLS_CERT_ALTNAME_INVALID$/,
    "set forwardHost to a name the upstream's certificate holds (openssl s_client -starttls smtp -connect HOST:PORT shows them; -connect alone with forwardSSL)",
  ],
];

/** What to check for a certificate that did not verify with Node's `code`, if it is one we know. */
function certificateHint(code: unknown): string | undefined {
  return typeof code === 'string' ? CERTIFICATE_HINTS.find(([codes]) => codes.test(code))?.[1] : undefined;
}

/**
 * An upstream certificate that does not verify: a setting to fix (or the upstream's certificate),
 * so the attempt is logged as a warning, with what to check.
 */
export function withCertificateHint(err: Error): Error {
  const code = (err as { originalCode?: unknown }).originalCode;
  const hint = certificateHint(code);
  if (!hint) return err;
  // Node ends a name mismatch with its list of names, which may be empty: `…cert's list: `; and
  // since Node 22.15 an untrusted one with advice of its own, a flag that Node 20 lacks: the
  // hint's advice works on every Node
  const message = err.message.replace(/; if the root CA is installed locally, try running Node\.js with --use-system-ca\s*$/, '');
  err.message = `${message.replace(/:\s*$/, '')}: ${hint}`;
  return Object.assign(err, { settingFault: true });
}

const TOO_MANY = /^\d{3}[ -][45]\.5\.3\b|too many recipients/i;

/**
 * Whether the upstream's certificate must verify for a connection to go on: where that protects
 * something. Implicit TLS cannot be stripped, and forwardRequireTLS asks for a secured upstream.
 * Otherwise STARTTLS is opportunistic, as Postfix's `may` level: encryption against a listener,
 * with whatever certificate; refusing one that does not verify would only turn mail away that a
 * man in the middle could still have in plain text, by stripping STARTTLS from the EHLO reply.
 * Credentials are the exception, judged once connected (see connect): they go to an upstream
 * elsewhere only if its certificate verified.
 */
function verifiesCertificates(settings: Pick<UpstreamSettings, 'secure' | 'requireTls'>): boolean {
  return settings.secure || settings.requireTls;
}

/**
 * Opportunistic TLS (Postfix's `may`): a retry whose STARTTLS fails, refused or in its handshake,
 * goes on in plain text (connect), as it would if a man in the middle had stripped the offer. Not
 * where TLS is required (forwardSSL, forwardRequireTLS), nor with credentials, which do not follow
 * a failed STARTTLS into plain text.
 */
function fallsBackToPlain(settings: Pick<UpstreamSettings, 'secure' | 'requireTls' | 'username'>): boolean {
  return !verifiesCertificates(settings) && !settings.username;
}

/** Why a certificate did not verify: OpenSSL's code (CERT_HAS_EXPIRED, DEPTH_ZERO_SELF_SIGNED_CERT), or Node's for a name it does not hold. */
function unverifiedReason(authorizationError: unknown): string {
  return authorizationError instanceof Error ? ((authorizationError as { code?: string }).code ?? authorizationError.message) : String(authorizationError);
}

/**
 * Credentials kept from an upstream elsewhere whose certificate did not verify (OpenSSL's code, or
 * Node's for a name, with the names the certificate holds, as Node's own error for a name lists them).
 */
function unverifiedForCredentials(reason: string, names: string | undefined): Error {
  const hint = certificateHint(reason) ?? 'check its certificate';
  const named = reason === 'ERR_TLS_CERT_ALTNAME_INVALID' ? `: it names ${names || 'no host'}` : '';
  const message = `the upstream's certificate did not verify (${reason}${named}), so forwardUsername/forwardPassword were not sent: ${hint}`;
  return settingFault('ETLS', message);
}

/**
 * nodemailer's options for one upstream connection. Its socketTimeout (inactivity on an open
 * connection) is the attempt's whole budget: the reply to the final dot may take long (RFC 5321
 * §4.5.3.2.6 gives it 10 minutes, as Postfix's smtp_data_done_timeout does), and the attempt's
 * deadline bounds the whole transaction anyway.
 */
export function connectionOptions(settings: UpstreamSettings): SMTPConnection.Options {
  const budget = settings.attemptTimeoutMs;
  const setupTimeout = Math.min(30_000, Math.max(1000, Math.floor(budget / 3)));
  // nodemailer logs every session step at info and every refused message at error; relayq's
  // own `delivery.attempt` line carries the same facts once, so its log is for debugging only.
  const debug = settings.logger.isLevelEnabled('debug');
  return {
    host: settings.host,
    port: settings.port,
    secure: settings.secure,
    // STARTTLS is used whenever offered (nodemailer's default); where the certificate must
    // verify, one that does not is a TLS error (retried), never a fallback to plain text.
    ignoreTLS: false,
    requireTLS: false,
    // explicit, so that NODE_TLS_REJECT_UNAUTHORIZED in the environment changes nothing
    tls: { rejectUnauthorized: verifiesCertificates(settings), ...settings.tls },
    name: settings.clientName,
    connectionTimeout: setupTimeout,
    greetingTimeout: setupTimeout,
    dnsTimeout: setupTimeout,
    socketTimeout: budget,
    logger: debug ? (libraryLogger(settings.logger, 'nodemailer', credentialSecrets(settings.username, [settings.password])) as never) : false,
    // and at debug the session's commands and replies, AUTH masked, without the message
    transactionLog: debug,
    // nodemailer sets TCP_NODELAY on every socket it opens (smtp-connection _onConnect), so
    // the final "." is not held back by Nagle's algorithm waiting for a delayed ACK.
  };
}

/**
 * The positions of the recipients a transaction deferred as over the upstream's limit of
 * recipients per transaction (`452`, or `552` taken for one, with `x.5.3` or "too many
 * recipients"), when it delivered to others, or refused every recipient at RCPT and some of them
 * for reasons of their own (some upstreams count refused recipients towards the limit). None when
 * it went on to DATA and delivered nothing (DATA refused, the connection lost), or when every
 * recipient was over the limit: another transaction would be refused the same way. So each
 * further transaction is smaller than the one before.
 */
function overLimit(result: BatchResult): number[] {
  const { recipients } = result;
  if (!result.everyRcptRefused && !recipients.some((r) => r.verdict === 'delivered')) return [];
  const over = recipients.flatMap((r, k) => (r.verdict === 'deferred' && (r.code === 452 || r.code === 552) && TOO_MANY.test(r.reply) ? [k] : []));
  return over.length < recipients.length ? over : [];
}

/** A reply's code and enhanced code: `554 5.7.1`, `250-`. */
const REPLY_STATUS = /^\d{3}(?:[ -][245]\.\d{1,3}\.\d{1,3}(?=\s|$)|[ -]|$)/;

export class SmtpUpstream {
  readonly label: string;
  private readonly options: SMTPConnection.Options;
  /**
   * Where a retry's failed STARTTLS is followed by plain text (fallsBackToPlain): the options of a
   * retry's connection (a refused STARTTLS goes on in plain text on it), and of the connection
   * opened after a failed handshake (no STARTTLS).
   */
  private readonly fallback: { retry: SMTPConnection.Options; plain: SMTPConnection.Options } | undefined;
  /**
   * Connections in plain text after a failed STARTTLS: each serves the retry it was opened for and
   * then says QUIT, so that no other mail's first attempt goes out on it without trying STARTTLS.
   */
  private readonly plainFallbacks = new WeakSet<SMTPConnection>();
  private readonly auth: SMTPConnection.Credentials | undefined;
  private readonly requireTls: boolean;
  private readonly peerAddress: (socketAddress: string) => string;
  /** Connections between two transactions, most recently used last. */
  private readonly idle: SMTPConnection[] = [];
  /** The timer of each idle connection that says QUIT when it has been idle for idleMs. */
  private readonly idleTimers = new Map<SMTPConnection, NodeJS.Timeout>();
  /** How long a connection may sit idle: well within the socket timeout, which would drop it without QUIT. */
  private readonly idleMs: number;
  /** When each connection was opened (REUSE_TIME_LIMIT_MS). */
  private readonly openedAt = new WeakMap<SMTPConnection, number>();
  private readonly now: () => number;
  /** Connections that said QUIT and have not yet ended. */
  private readonly quitting = new Set<Promise<void>>();
  /** Connections waiting for the reply to the RSET after a refused message, and that wait. */
  private readonly resetting = new Map<SMTPConnection, Promise<void>>();
  /** Connections opened and not yet ended or told to QUIT: in a transaction, idle or resetting. */
  private readonly open = new Set<SMTPConnection>();
  /** Connections in a transaction: each was greeted and set up, and an attempt is sending on it. */
  private readonly transacting = new Set<SMTPConnection>();
  /** New connections being set up (connect). */
  private readonly settingUp = new Set<Promise<SMTPConnection>>();
  /** performance.now() when a new connection was last set up. */
  private lastSetUpAt = Number.NEGATIVE_INFINITY;
  /** Places kept for connections about to be opened (idleConnection). */
  private connecting = 0;
  private readonly maxConnections: number;
  /** Connections set up (greeted, secured, logged in): open ones of these work. */
  private readonly ready = new WeakSet<SMTPConnection>();
  /** How many connections the pool opens: maxConnections, or fewer after the upstream refused more (atConnectionLimit). */
  private limit: number;
  /** now() when the upstream last refused a connection beyond those open, or the limit was last raised. */
  private limitedAt = Number.NEGATIVE_INFINITY;
  /** The lowest limit a warning named. */
  private warnedLimit: number;
  /** Attempts waiting for a connection to come back to the pool or end (idleConnection). */
  private waiters: Array<() => void> = [];
  /** performance.now() when a connection the upstream had taken last said QUIT or ended: the upstream may count it a moment longer. */
  private lastEndedAt = Number.NEGATIVE_INFINITY;
  private closed = false;
  private readonly log: Logger;
  private readonly maxMessageSize: number;
  /** Replies as stored and logged: an upstream may repeat the user name (`535 … for <user>`), which may hold the password. */
  private readonly maskReply: ((reply: string) => string) | undefined;
  /** The last SIZE limit warned of: a limit is named once, not at every connection. */
  private warnedSizeLimit = 0;

  constructor(settings: UpstreamSettings) {
    this.label = hostPort(settings.host, settings.port);
    this.options = connectionOptions(settings);
    this.fallback = fallsBackToPlain(settings)
      ? { retry: { ...this.options, opportunisticTLS: true }, plain: { ...this.options, ignoreTLS: true } }
      : undefined;
    this.idleMs = Math.min(IDLE_QUIT_MS, Math.floor(settings.attemptTimeoutMs / 2));
    this.auth = settings.username ? { user: settings.username, pass: settings.password } : undefined;
    this.maskReply = masker(credentialSecrets(settings.username, [settings.password]));
    this.requireTls = settings.requireTls;
    this.peerAddress = settings.peerAddress ?? ((address) => address);
    this.now = settings.now ?? Date.now;
    this.log = settings.logger;
    this.maxMessageSize = settings.maxMessageSize;
    this.maxConnections = settings.maxConnections;
    this.limit = settings.maxConnections;
    this.warnedLimit = settings.maxConnections;
  }

  /**
   * The upstream was reached since `since` (performance.now()): a new connection was set up, or an
   * attempt is in a transaction with it now (on a connection it greeted).
   */
  reachedSince(since: number): boolean {
    return this.lastSetUpAt > since || this.transacting.size > 0;
  }

  /**
   * Resolves when one of the new connections being set up now has been (the upstream is reached),
   * or all of them have failed; undefined when there are none.
   */
  setupsSettled(): Promise<void> | undefined {
    if (this.settingUp.size === 0) return undefined;
    return Promise.any(this.settingUp).then(
      () => undefined,
      () => undefined,
    );
  }

  /**
   * One SMTP transaction for the batch, or more for the recipients over the upstream's limit per
   * transaction; never throws. `signal` aborts it and closes its connection. `beforeNext` gets
   * the results so far before each further transaction, and is waited for (it may abort).
   */
  async send(claim: ClaimedBatch, signal: AbortSignal, beforeNext?: (sofar: BatchResult) => Promise<void>): Promise<BatchResult> {
    const addresses = claim.recipients.map((r) => r.address);
    if (!claim.raw) return uniformResult(this.label, addresses.length, 'failed', 'message content is missing');
    const rcpts = addresses.map(normalizeForEnvelope);
    // 8-bit bytes in the message: BODY=8BITMIME when the upstream offers it
    const envelope: Envelope = {
      from: normalizeForEnvelope(claim.mailFrom),
      to: rcpts,
      size: claim.raw.length,
      use8BitMime: !isAsciiBytes(claim.raw),
      smtpUtf8: claim.smtpUtf8,
    };
    // a retry (the batch had an attempt before, whatever its outcome) may go on in plain text
    // after a failed STARTTLS
    const retryOf = claim.recipients.some((r) => r.attempts > 1) ? claim.messageId : undefined;
    const result = await this.sendTo(envelope, claim.raw, signal, retryOf);
    // The recipients over the upstream's limit per transaction go at once in another one, as long
    // as each delivers to some or refuses some for reasons of their own at RCPT (RFC 5321
    // §4.5.3.1.10; see overLimit); they are not held back for a retry.
    let again = overLimit(result);
    while (again.length > 0 && !signal.aborted) {
      await beforeNext?.(this.masked(result));
      const next = await this.sendTo({ ...envelope, to: again.map((i) => rcpts[i]) }, claim.raw, signal, retryOf);
      again.forEach((i, k) => {
        result.recipients[i] = next.recipients[k];
      });
      // refused as a whole (a 5xx to MAIL FROM or DATA), or every recipient of the batch refused
      // for good at RCPT, over its transactions: so is the batch, for continueOnError (its
      // recipients refused one by one are not when an earlier transaction delivered to others)
      if (next.refusedWhole || result.recipients.every((r) => r.verdict === 'failed')) {
        Object.assign(result, { permanentFailure: true, refusedWhole: next.refusedWhole, code: next.code, reply: next.reply });
      }
      again = overLimit(next).map((k) => again[k]);
    }
    return this.masked(result);
  }

  /**
   * Sets up a connection (greeting, EHLO, STARTTLS, login) without a transaction, and leaves it
   * in the pool for the next batch: a dead host probe (UpstreamSuspension.probe). Never throws:
   * resolves with the result a batch that failed the same way would have, of no recipient.
   */
  async probe(signal: AbortSignal): Promise<BatchResult> {
    try {
      let connection = await this.idleConnection(signal);
      if (!connection) {
        // the place idleConnection kept for it becomes the connection (see transaction)
        this.connecting--;
        connection = await this.connect(signal, undefined);
      }
      this.release(connection);
      return uniformResult(this.label, 0, 'delivered', 'connected');
    } catch (error) {
      return this.masked(resultFromNodemailer(this.label, [], { error }));
    }
  }

  /** One transaction; never throws. */
  private async sendTo(envelope: Envelope, raw: Uint8Array, signal: AbortSignal, retryOf: string | undefined): Promise<BatchResult> {
    try {
      const info = await this.transaction(envelope, raw, signal, retryOf);
      return resultFromNodemailer(this.label, envelope.to, { info });
    } catch (error) {
      return resultFromNodemailer(this.label, envelope.to, { error });
    }
  }

  /**
   * A result as it is stored and logged, once judged (a reply's words may be what judges it); a
   * reply's code and enhanced code, which the engine reads again, are kept as they are.
   */
  private masked(result: BatchResult): BatchResult {
    const mask = this.maskReply;
    if (!mask) return result;
    const maskReply = (reply: string) => {
      const status = REPLY_STATUS.exec(reply)?.[0] ?? '';
      return status + mask(reply.slice(status.length));
    };
    return { ...result, reply: maskReply(result.reply), recipients: result.recipients.map((r) => ({ ...r, reply: maskReply(r.reply) })) };
  }

  /**
   * Says QUIT on the idle connections and waits for them to end (QUIT_WAIT_MS for the RSETs being
   * answered, then QUIT_WAIT_MS for each QUIT); in-flight transactions were aborted by their
   * signals first.
   */
  async close(): Promise<void> {
    this.closed = true;
    for (const connection of [...this.idle]) this.quit(connection);
    // a connection whose RSET is answered in time says QUIT too (release, now that the pool is closed)
    await settleWithin(this.resetting, QUIT_WAIT_MS);
    for (const connection of this.resetting.keys()) connection.close();
    await Promise.allSettled(this.quitting);
  }

  /**
   * Sends on an idle connection when there is one, else on a new one. A reused connection that
   * the upstream had closed meanwhile (its idle timeout) fails before it answers a recipient and
   * before a byte of the message was sent; the transaction then runs once more, on another
   * connection.
   */
  private async transaction(envelope: Envelope, raw: Uint8Array, signal: AbortSignal, retryOf: string | undefined): Promise<SendInfo> {
    for (;;) {
      const reused = await this.idleConnection(signal);
      if (reused) {
        try {
          return await this.sendOn(reused, envelope, raw, signal);
        } catch (err) {
          const e = err as UpstreamError;
          if (!(e.notSent && !e.answered && endedConnection(e)) || signal.aborted) throw err;
          continue;
        }
      }
      // the place idleConnection kept for it becomes the connection, in one step (connect counts it)
      this.connecting--;
      let connection: SMTPConnection;
      try {
        connection = await this.connect(signal, retryOf);
      } catch (err) {
        if (await this.atConnectionLimit(err as UpstreamError, signal)) continue;
        throw err;
      }
      return this.sendOn(connection, envelope, raw, signal);
    }
  }

  /**
   * A new connection refused with `421` while others to the upstream work: the upstream's limit of
   * connections per client (smtp-server's maxClients; Postfix's
   * smtpd_client_connection_count_limit answers `421 4.7.0 … too many connections`), not a
   * failure of this attempt, which waits for one of those connections instead of being deferred.
   * The pool keeps to as many connections as work, and tries one more after LIMIT_RAISE_MS
   * without such a refusal (raiseLimit), as Postfix's concurrency feedback lowers and raises its
   * number of sessions. Connections being set up meanwhile are waited for first: attempts that
   * start together learn together which of them the upstream took. With none open, a refusal
   * within QUIT_WAIT_MS of relayq's closing a connection it had set up is waited out and the
   * connection tried once more: the upstream may count the closed one until it sees it close.
   */
  private async atConnectionLimit(err: UpstreamError, signal: AbortSignal): Promise<boolean> {
    if (err.responseCode !== 421 || signal.aborted) return false;
    if (this.settingUp.size > 0) await Promise.race([Promise.allSettled(this.settingUp), whenAborted(signal)]);
    const working = [...this.open].filter((c) => this.ready.has(c)).length;
    if (signal.aborted) return false;
    if (working === 0) {
      // none open: the refusal may be for relayq's own connection that just said QUIT or ended
      // (the upstream counts it until it sees the close): tried again once that is past
      const wait = this.lastEndedAt + QUIT_WAIT_MS - performance.now();
      if (wait <= 0) return false;
      await Promise.race([new Promise((resolve) => setTimeout(resolve, wait).unref()), whenAborted(signal)]);
      return !signal.aborted;
    }
    this.limitedAt = this.now();
    this.limit = Math.min(this.limit, working);
    if (working < this.warnedLimit) {
      this.warnedLimit = working;
      const reply = this.maskReply ? this.maskReply(String(err.response)) : err.response;
      this.log.warn(
        { event: 'upstream.connection_limit', upstream: this.label, connections: working, workerCount: this.maxConnections, reply },
        `the upstream refused a connection while ${working} to it were open: attempts wait for those instead of being deferred, and relayq opens no more than ${working} until a minute without such a refusal has passed; a workerCount of at most the upstream's limit of connections per client avoids the refusals`,
      );
    }
    return true;
  }

  /** A transaction delivered: one connection more may be opened once LIMIT_RAISE_MS passed without a refusal (atConnectionLimit). */
  private raiseLimit(): void {
    if (this.limit >= this.maxConnections || this.now() - this.limitedAt < LIMIT_RAISE_MS) return;
    this.limit++;
    this.limitedAt = this.now();
    this.poolChanged();
  }

  /** Wakes the attempts waiting for a connection (idleConnection): one came back to the pool, ended, or may be opened. */
  private poolChanged(): void {
    const waiters = this.waiters;
    this.waiters = [];
    for (const wake of waiters) wake();
  }

  /**
   * An idle connection, taken out of the pool; or undefined, with a place kept (`connecting`) for
   * a new one, which the caller opens. With maxConnections open and none idle, waits for a
   * connection's RSET to be answered (it then comes back to the pool; one not answered within the
   * greeting timeout, or that ends, is gone) rather than open one more, as Postfix's client
   * finishes its RSET before it takes the next message: an upstream slow to answer after an error
   * (Postfix's smtpd_error_sleep_time) would otherwise get a new session from every attempt while
   * the earlier ones wait. So does an attempt with as many connections open as the upstream
   * takes (atConnectionLimit), for one of them. Throws once `signal` has aborted: no connection is
   * opened then.
   */
  private async idleConnection(signal: AbortSignal): Promise<SMTPConnection | undefined> {
    let aborted: Promise<void> | undefined;
    for (;;) {
      if (signal.aborted) throw abortError(signal);
      const connection = this.idle.at(-1);
      if (connection && this.pastReuseLimit(connection)) {
        this.quit(connection);
        continue;
      }
      if (connection) {
        this.forget(connection);
        return connection;
      }
      // attempts that start together (one claim's batches) decide before any of them connects
      const room = this.open.size + this.connecting < this.limit;
      if (room || (this.resetting.size === 0 && this.limit === this.maxConnections)) {
        this.connecting++;
        return undefined;
      }
      aborted ??= whenAborted(signal);
      await Promise.race([new Promise<void>((resolve) => this.waiters.push(resolve)), aborted]);
    }
  }

  private sendOn(connection: SMTPConnection, envelope: Envelope, raw: Uint8Array, signal: AbortSignal): Promise<SendInfo> {
    return new Promise((resolve, reject) => {
      const offer = signal.aborted ? { refusal: abortError(signal) } : this.offerable(connection, envelope);
      if ('refusal' in offer) {
        this.release(connection);
        return reject(offer.refusal);
      }
      const { leftOut } = offer;
      // a stream, not the buffer itself, so that a failure tells whether any byte went out
      const message = Readable.from(pieces(raw), { objectMode: false });
      dataStreams.delete(connection); // of the connection's previous transaction
      if (offer.envelope.smtpUtf8) smtpUtf8Transactions.add(connection);
      else smtpUtf8Transactions.delete(connection);
      // a fresh object: nodemailer records this transaction's replies on it (envelopeReplies)
      const sent = { ...offer.envelope };
      // the attempt's deadline, or a stop: the connection is closed, and the replies that came
      // before count as they would before a close
      const onAbort = () => {
        this.transacting.delete(connection);
        connection.close();
        reject(this.failedSend(connection, abortError(signal), { message, sent, leftOut }));
      };
      signal.addEventListener('abort', onAbort, { once: true });
      this.transacting.add(connection);
      connection.send(sent, message, (err, info) => {
        this.transacting.delete(connection);
        signal.removeEventListener('abort', onAbort);
        if (signal.aborted) return;
        if (err) return reject(this.failedSend(connection, err as UpstreamError, { message, sent, leftOut }));
        this.release(connection);
        this.raiseLimit();
        if (leftOut.length) info.rejectedErrors = [...(info.rejectedErrors ?? []), ...leftOut];
        resolve(Object.assign(info, { tls: tlsVersion(connection) }));
      });
    });
  }

  /**
   * The envelope this connection may be offered, with the recipients left out of it; or why the
   * message may not be offered at all.
   */
  private offerable(connection: SMTPConnection, envelope: Envelope): { envelope: Envelope; leftOut: SMTPConnection.SMTPError[] } | { refusal: Error } {
    // A message over the upstream's SIZE is not offered to it at all.
    const limit = sizeLimit(connection);
    if (limit > 0 && envelope.size > limit) return { refusal: sizeRefusal(this.label, envelope.size, limit) };
    // No non-ASCII address to a server that does not offer SMTPUTF8 (nodemailer would send it
    // anyway). As in Postfix, such a recipient fails permanently; so does the whole batch when
    // the sender is one. The other recipients go out.
    if (offers(connection, 'SMTPUTF8') || [envelope.from, ...envelope.to].every(isAscii)) return { envelope, leftOut: [] };
    const sendable = envelope.to.filter(isAscii);
    if (!isAscii(envelope.from) || sendable.length === 0) return { refusal: smtpUtf8Refusal(this.label) };
    const leftOut = envelope.to.filter((r) => !isAscii(r)).map((r) => smtpUtf8Refusal(this.label, r));
    return { envelope: { ...envelope, to: sendable }, leftOut };
  }

  /**
   * A send that failed: the error with what it says of the recipients, and the connection reset
   * for the next message when only this message was refused, else closed.
   */
  private failedSend(
    connection: SMTPConnection,
    err: UpstreamError,
    transaction: { message: Readable; sent: Envelope; leftOut: SMTPConnection.SMTPError[] },
  ): UpstreamError {
    const { message, sent, leftOut } = transaction;
    // the replies to this transaction's MAIL and RCPTs (none when it failed before it sent them)
    const recorded = envelopeReplies(connection);
    const replies = recorded === sent ? recorded : undefined;
    // A pipelined envelope refused and the connection closed (RFC 5321 §3.8; Haraka's
    // DENYDISCONNECT), or the attempt's time up, before the reply to DATA: the refusal, not the
    // close, is what happened to the message.
    const ended = err.code === 'ECONNECTION' || err.code === 'EABORT';
    const e = (ended && replies && refusalBeforeClose(replies, sent.to.length)) || err;
    e.notSent = !message.readableDidRead;
    e.tls = tlsVersion(connection);
    withEndUnanswered(e, connection);
    // Replies out of step with the commands (a 2xx to DATA, a 354 to the final dot) were
    // read against the wrong RCPTs too: none of those is taken, and every recipient waits.
    const outOfStep =
      e.code === 'EPROTOCOL' || (e.command === 'DATA' && typeof e.responseCode === 'number' && (e.responseCode < 400 || e.responseCode >= 600));
    if (outOfStep) e.rejectedErrors = undefined;
    else if (!e.rejectedErrors && !replies?.mailError && replies?.rejectedErrors?.length) {
      // A refusal of DATA or of the message, or a close, says nothing of the recipients the
      // upstream had already refused at RCPT; nodemailer keeps those on the envelope only. (After
      // a refused MAIL, the replies to RCPT are the upstream's `503 need MAIL command`.)
      e.rejectedErrors = replies.rejectedErrors;
    }
    // the upstream answered a recipient of this transaction: it was there, not a connection
    // that had ended while it waited in the pool (transaction())
    if (replies?.accepted?.length || replies?.rejectedErrors?.length) e.answered = true;
    if (leftOut.length) e.rejectedErrors = [...(e.rejectedErrors ?? []), ...leftOut];
    const refusal = !outOfStep && typeof e.responseCode === 'number' && e.responseCode >= 400 && e.responseCode < 600 && e.responseCode !== 421;
    if ((err.code === 'EENVELOPE' || err.code === 'EMESSAGE') && refusal && !connection.destroyed) {
      // the upstream refused this message; the session itself is fine (another reply, such
      // as a 354 to the final dot, says it is not)
      this.reset(connection);
    } else {
      connection.close();
    }
    return e;
  }

  /**
   * A new connection, greeted, secured (STARTTLS when offered) and logged in when configured. A
   * failed STARTTLS defers a first attempt; a retry (of the message `retryOf`) goes on in plain
   * text where that is allowed (fallsBackToPlain): after a refused STARTTLS on the same connection,
   * after a failed handshake on a new one. So does Postfix at its `may` level: it defers the mail
   * at first, and falls back to plain text when STARTTLS fails again once the mail has waited.
   */
  private connect(signal: AbortSignal, retryOf: string | undefined): Promise<SMTPConnection> {
    const fallback = retryOf === undefined ? undefined : this.fallback;
    const setUp = this.openConnection(signal, fallback?.retry ?? this.options, retryOf).catch((err: UpstreamError) => {
      if (!err.inHandshake || !fallback || signal.aborted) throw err;
      this.noteTlsFailed(classifyUpstreamError(err).reply, retryOf);
      return this.openConnection(signal, fallback.plain, retryOf);
    });
    this.settingUp.add(setUp);
    const done = () => this.settingUp.delete(setUp);
    setUp.then(done, done);
    return setUp;
  }

  private openConnection(signal: AbortSignal, options: SMTPConnection.Options, retryOf: string | undefined): Promise<SMTPConnection> {
    return new Promise((resolve, reject) => {
      const connection = new SMTPConnection(options);
      if (options === this.fallback?.plain) this.plainFallbacks.add(connection);
      this.openedAt.set(connection, this.now());
      this.open.add(connection);
      hookSendStream(connection, (stream) => dataStreams.set(connection, stream));
      requestSmtpUtf8(connection, () => smtpUtf8Transactions.has(connection));
      requireGoAheadForData(connection);
      requireHelloReply(connection);
      readRepliesBeforeClose(connection);
      // nodemailer goes on in plain text after a refused STARTTLS (opportunisticTLS)
      if (options.opportunisticTLS) {
        onStartTlsRefused(connection, (reply) => {
          this.plainFallbacks.add(connection);
          this.noteTlsFailed(reply, retryOf);
        });
      }
      let settled = false;
      const settle = (err?: Error) => {
        if (settled) return;
        settled = true;
        signal.removeEventListener('abort', onAbort);
        if (err) {
          connection.close();
          const e = err as UpstreamError;
          if (!signal.aborted && (unreachable(e) || refusedSession(e))) e.unreachable = true;
          reject(e);
        } else {
          this.lastSetUpAt = performance.now();
          this.ready.add(connection);
          resolve(connection);
        }
      };
      const onAbort = () => settle(abortError(signal));
      signal.addEventListener('abort', onAbort, { once: true });
      // Errors of a transaction reach its send callback; one that ends an idle connection only
      // ends it. Either way the connection leaves the pool when it ends.
      connection.on('error', (err: Error) => {
        if (upgrading(connection)) Object.assign(err, { inHandshake: true });
        settle(withCertificateHint(this.options.secure ? withTlsHint(err, true) : withImplicitTlsHint(withTlsHint(err, false))));
      });
      connection.once('end', () => {
        if (this.open.has(connection) && this.ready.has(connection)) this.lastEndedAt = performance.now();
        this.forget(connection);
        this.open.delete(connection);
        this.poolChanged();
        settle(Object.assign(new Error('Connection closed unexpectedly'), { code: 'ECONNECTION' }));
      });
      connection.connect((err) => {
        if (err) return settle(err);
        tlsVersions.set(connection, readTlsVersion(connection));
        this.noteUnverified(connection);
        // with implicit TLS, or after STARTTLS, the connection is secure; nodemailer goes on in
        // plain text when the upstream's EHLO offered no STARTTLS
        if (this.requireTls && !connection.secure) return settle(tlsRequired(this.label));
        this.warnOfSizeLimit(sizeLimit(connection));
        if (!this.auth) return settle();
        // The password goes out encrypted to the upstream the certificate names, or over
        // loopback: an upstream elsewhere that offers no STARTTLS (or a man in the middle that
        // strips it, or answers with a certificate of its own) does not get it (Postfix:
        // noplaintext). This comes first: a submission server offers AUTH only after STARTTLS, so
        // with STARTTLS stripped it offers neither, and the fault is the missing TLS, not the credentials.
        const socket = socketOf(connection);
        if (!isLoopback(this.peerAddress(socket?.remoteAddress ?? ''))) {
          if (!connection.secure) return settle(settingFault('ETLS', PLAINTEXT_AUTH_REFUSED));
          if (socket?.authorized === false) {
            return settle(unverifiedForCredentials(unverifiedReason(socket.authorizationError), socket.getPeerCertificate?.().subjectaltname));
          }
        }
        if (!connection.allowsAuth) return settle(settingFault('EAUTH', NO_AUTH_OFFERED));
        connection.login(this.auth, (loginErr) => settle(loginErr ? Object.assign(loginErr, { settingFault: true }) : undefined));
      });
    });
  }

  /** A retry's STARTTLS failed: it is tried in plain text (connect), on that connection or a new one. */
  private noteTlsFailed(err: string, queueId: string | undefined): void {
    this.log.warn(
      { event: 'upstream.tls_failed', upstream: this.label, queueId, err },
      'STARTTLS with the upstream failed at a retry: it is tried in plain text, as opportunistic TLS does (forwardRequireTLS would defer it)',
    );
  }

  /** Opportunistic STARTTLS with a certificate that did not verify: said once per connection, as Postfix does. */
  private noteUnverified(connection: SMTPConnection): void {
    const socket = socketOf(connection);
    if (!connection.secure || socket?.authorized !== false) return;
    this.log.info(
      { event: 'upstream.tls_unverified', upstream: this.label, tls: tlsVersion(connection), reason: unverifiedReason(socket.authorizationError) },
      'untrusted TLS connection to the upstream: its certificate did not verify, which opportunistic STARTTLS accepts (forwardRequireTLS does not, nor do credentials for an upstream off loopback)',
    );
  }

  /**
   * An upstream whose SIZE is below what relayq accepts refuses the larger messages after relayq
   * has answered `250` for them: they fail for good with 5.3.4. That is said once per limit, when
   * a connection reads it, with the maxMessageSize that avoids it.
   */
  private warnOfSizeLimit(limit: number): void {
    if (limit === 0 || limit >= this.maxMessageSize + RECEIVED_HEADER_ROOM || limit === this.warnedSizeLimit) return;
    this.warnedSizeLimit = limit;
    const fits = limit - RECEIVED_HEADER_ROOM;
    const suggested = fits >= MIN_MESSAGE_SIZE_LIMIT ? fits : null;
    const advice =
      suggested !== null
        ? `set maxMessageSize to at most ${suggested}, or raise the upstream's limit`
        : `raise the upstream's limit: it leaves no room for the smallest maxMessageSize, ${MIN_MESSAGE_SIZE_LIMIT}`;
    this.log.warn(
      { event: 'upstream.size_limit', upstream: this.label, sizeLimit: limit, maxMessageSize: this.maxMessageSize, suggested },
      `the upstream takes messages of at most ${limit} bytes (SIZE), and relayq accepts up to maxMessageSize ${this.maxMessageSize} bytes plus its Received: header, so a message over the upstream's limit gets 250 here and then fails for good with 5.3.4; ${advice}`,
    );
  }

  private release(connection: SMTPConnection): void {
    if (connection.destroyed) {
      connection.close();
    } else if (this.closed || this.pastReuseLimit(connection) || this.plainFallbacks.has(connection)) {
      this.quit(connection);
    } else {
      this.idle.push(connection);
      this.idleTimers.set(connection, setTimeout(() => this.quit(connection), this.idleMs).unref());
    }
    this.poolChanged();
  }

  private pastReuseLimit(connection: SMTPConnection): boolean {
    return this.now() - (this.openedAt.get(connection) ?? Number.NEGATIVE_INFINITY) >= REUSE_TIME_LIMIT_MS;
  }

  /**
   * RSET after a refused message: the connection goes back to the pool once it is answered. A live
   * server answers at once; one that has not within a greeting's time (at most 30 s; no attempt's
   * deadline bounds this wait) is cut off.
   */
  private reset(connection: SMTPConnection): void {
    let finished = false;
    const answered = new Promise<void>((resolve) => {
      const done = (err: Error | null) => {
        if (finished) return;
        finished = true;
        clearTimeout(cutOff);
        connection.removeListener('end', ended);
        this.resetting.delete(connection);
        if (err) connection.close();
        else this.release(connection);
        this.poolChanged();
        resolve();
      };
      const cutOff = setTimeout(() => done(new Error('no reply to RSET')), this.options.greetingTimeout).unref();
      // a connection that ends meanwhile never calls back: an attempt waiting for it goes on
      const ended = () => done(new Error('connection ended before the reply to RSET'));
      connection.once('end', ended);
      connection.reset((err) => done(err ?? null));
    });
    // a connection that has ended already is answered at once, before it would be in the map: an
    // entry then would stay for good, and an attempt waiting for a reset (idleConnection) would
    // race a settled promise for ever, starving the event loop
    if (!finished) this.resetting.set(connection, answered);
  }

  /**
   * Ends a connection politely (RFC 5321 §4.1.1.10: QUIT before closing), as Postfix does when it
   * drops a cached connection; an upstream that does not answer within QUIT_WAIT_MS is cut off.
   */
  private quit(connection: SMTPConnection): void {
    this.lastEndedAt = performance.now();
    this.forget(connection);
    this.open.delete(connection);
    this.poolChanged();
    const ended = new Promise<void>((resolve) => {
      const cutOff = setTimeout(() => {
        connection.close();
        resolve();
      }, QUIT_WAIT_MS);
      connection.once('end', () => {
        clearTimeout(cutOff);
        resolve();
      });
    });
    this.quitting.add(ended);
    void ended.then(() => this.quitting.delete(ended));
    connection.quit();
  }

  private forget(connection: SMTPConnection): void {
    this.resetting.delete(connection);
    clearTimeout(this.idleTimers.get(connection));
    this.idleTimers.delete(connection);
    const i = this.idle.indexOf(connection);
    if (i >= 0) this.idle.splice(i, 1);
  }
}
