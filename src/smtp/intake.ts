// SMTP intake: access control, AUTH, envelope checks, policy (limits, queue size, disk) and the
// durable insert. Invariant: `250` is sent only from the callback of the commit that holds the
// message; every refusal carries the reply code and enhanced code of the spec's §2 table.
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from 'pino';
import type { SMTPServerAddress, SMTPServerAuthentication, SMTPServerDataStream, SMTPServerSession } from 'smtp-server';
import { clientFilter, isLoopback, normalizeIp, secretsEqual } from '../access-control.js';
import { addressKey, decodeIdnDomain, isAscii } from '../address.js';
import type { Clock } from '../clock.js';
import { type Config, configSecrets } from '../config/schema.js';
import { credentialSecrets, holdsSecret, type LibraryLogger, libraryLogger } from '../logger.js';
import { LOCK_HELD_TOO_LONG, realDatabasePath, type Sqlite } from '../store/db.js';
import type { DiskSpace } from '../store/disk.js';
import {
  checkRateLimits,
  isQueueFull,
  type LimitHit,
  newQueueId,
  PolicyRefusal,
  rateLimitMessage,
} from '../store/intake.js';
import type { StoreWriter } from '../store/writer.js';
import { authClientKey, LoginThrottle } from './login-throttle.js';
import { BareLineEndingScanner, isValidAddress, MAX_RECEIVED_HEADERS, ReceivedHeaderCounter, receivedHeader, subjectOf } from './message.js';
import { inputAhead, RelayqSmtpServer, tlsNotCompleted, whenInputEnds } from './server.js';
import { MessageBytes, type ReceivedBytes, Spool } from './spool.js';

export interface IntakeDeps {
  config: Config;
  sqlite: Sqlite;
  writer: StoreWriter;
  disk: DiskSpace;
  clock: Clock;
  logger: Logger;
  /** Where a session comes from; tests inject non-loopback peers here. */
  peerAddress?: (session: SMTPServerSession) => string;
  /** Paces MAIL while delivery is behind (inFlowDelay). */
  inFlow: MailPacer;
  /** tls.cert and tls.key as read at start (readTlsFiles); STARTTLS is offered with them. */
  tls?: { cert: Buffer; key: Buffer };
}

/**
 * Delivery's in-flow pacing as intake sees it: admit() is undefined when a MAIL may go ahead at
 * once, else its wait, which `cancel()` gives up when the session closes.
 */
export interface MailPacer {
  admit(): PacedMail | undefined;
}
type PacedMail = Promise<void> & { cancel(): void };

interface SessionState {
  queueId?: string;
  /** Messages of this session stored (answered `250`, if the client was still there). */
  accepted?: number;
  /** Their queue ids, the first MAX_LISTED of them. */
  queueIds?: string[];
  /** The commit of its message in progress, which the closing log line waits for. */
  committing?: Promise<void>;
  /** Its replies of 400 and above, the first MAX_LISTED of them, and how many in all. */
  refused?: string[];
  refusedCount?: number;
  /**
   * The recipients of the transaction under way (`of`: smtp-server's list, a new one at each MAIL
   * and RSET) by the key they are stored under, which maxRecipients counts; `spelled`: each address
   * in lower case to its first spelling, which smtp-server's list loses when the client repeats the
   * address in another case.
   */
  recipients?: { of: SMTPServerAddress[]; keys: Set<string>; spelled: Map<string, string> };
  /** A MAIL waiting for in-flow pacing; cancelled if the connection closes meanwhile. */
  pacing?: PacedMail;
  /** The client has gone. */
  closed?: boolean;
  /** The message the client was sending when it went (Postfix's "lost connection after DATA"). */
  lostInData?: { queueId: string; bytes: number };
}

type Callback = (err?: Error | null) => void;

function reply(code: number, text: string): Error & { responseCode: number } {
  return Object.assign(new Error(text), { responseCode: code });
}

/** A storage error as logged: SQLite's bare "database is locked" says what held it. */
function storeError(err: unknown): string {
  const message = (err as Error).message;
  return (err as { code?: unknown }).code === 'SQLITE_BUSY' ? `${message}: ${LOCK_HELD_TOO_LONG}` : message;
}

/** The text of every 421 a shutdown sends (spec §2). */
const SHUTTING_DOWN = '4.3.2 Service shutting down, try again later';
/** How long close() waits for the session lines of the connections it closed (see close). */
const SESSION_LINES_WAIT_MS = 1000;
/** smtp.connection_limit lines at most this often (noteConnectionLimit). */
const CONNECTION_LIMIT_LOG_MS = 60_000;
/** Connections one client address may hold when any address may connect (Postfix's smtpd_client_connection_count_limit). */
export const MAX_CONNECTIONS_PER_CLIENT = 50;

/** The reply to a connection or MAIL once shutdown has begun, and to DATA once its grace period is over. */
function shuttingDown() {
  return reply(421, SHUTTING_DOWN);
}

/**
 * Parameters taken on MAIL FROM and RCPT TO: those of the extensions relayq offers (smtp-server
 * checks their values), and DSN's, which are accepted and ignored because DSN is not offered
 * (as Postfix does when it does not announce DSN; some mailers send NOTIFY regardless).
 */
const MAIL_PARAMETERS = ['SIZE', 'BODY', 'SMTPUTF8', 'AUTH', 'RET', 'ENVID'];
const RCPT_PARAMETERS = ['NOTIFY', 'ORCPT'];

/**
 * Why a MAIL FROM (sender) or RCPT TO path is refused, or null: an unknown parameter (`555`,
 * RFC 5321 §4.1.1.11), a bad address, or an address whose local part is not ASCII in a
 * transaction that did not declare SMTPUTF8 (`553 5.6.7`, RFC 6531). Only the local part
 * counts: smtp-server hands over domains decoded from punycode, so `user@xn--mnchen-3ya.de`
 * arrives as `user@münchen.de`, and a domain goes out in punycode again anyway.
 * `<postmaster>` without a domain is a valid recipient (RFC 5321 §4.5.1).
 */
function refusedPath(path: SMTPServerAddress, smtpUtf8: boolean, sender: boolean) {
  const parameters = sender ? MAIL_PARAMETERS : RCPT_PARAMETERS;
  const unsupported = Object.keys(path.args || {}).find((name) => !parameters.includes(name.toUpperCase()));
  if (unsupported) return reply(555, `5.5.4 Unsupported option: ${unsupported}`);
  const address = path.address;
  if (!sender && /^postmaster$/i.test(address)) return null;
  if (!isValidAddress(address, sender)) return reply(501, `5.1.3 Bad ${sender ? 'sender' : 'recipient'} address syntax`);
  const local = address.slice(0, address.lastIndexOf('@'));
  if (!smtpUtf8 && !isAscii(local)) return reply(553, '5.6.7 Must declare SMTPUTF8 to send unicode address');
  return null;
}

/** Socket errors that mean the client went away (Postfix logs "lost connection"), not a relay fault. */
const LOST_CONNECTION = new Set(['ECONNRESET', 'EPIPE', 'ETIMEDOUT', 'EHOSTUNREACH', 'ENETUNREACH']);

function lostConnection(err: unknown): err is Error & { code: string; remoteAddress?: string } {
  return LOST_CONNECTION.has((err as { code?: string } | undefined)?.code ?? '');
}

/**
 * TLS that failed on the client's side: plain text after `220 2.0.0 Ready to start TLS`, a protocol or
 * cipher the client lacks, a client that refused the certificate. Not a relay fault.
 */
function clientTlsFailure(err: unknown): err is Error & { code: string; reason?: string; remoteAddress?: string } {
  const e = err as { code?: unknown; library?: unknown } | undefined;
  return (typeof e?.code === 'string' && e.code.startsWith('ERR_SSL_')) || e?.library === 'SSL routines';
}

/**
 * The logger smtp-server is given (see libraryLogger). smtp-server logs every socket error of a
 * session at error, stack included (a TLS failure twice); a client that went away, or whose TLS
 * failed, is logged to `intakeLog` at info instead, in one line (`smtp.connection_lost`,
 * `smtp.tls_failed`), as Postfix logs "lost connection" and "SSL_accept error".
 */
function smtpServerLogger(log: Logger, intakeLog: Logger, secrets: readonly string[]): LibraryLogger {
  const methods = libraryLogger(log, 'smtp-server', secrets, 'session');
  const { error } = methods;
  const logged = new WeakSet<object>();
  /** Sessions whose lost connection was logged lately: over TLS, the TLS and the TCP socket both report it. */
  const lost = new Set<string>();
  methods.error = (entry, ...rest) => {
    const { err, tnx } = (entry ?? {}) as { err?: unknown; tnx?: string };
    // smtp-server's message is '%s %s %s': the session's id, the client's address, the error
    const session = typeof rest[1] === 'string' ? rest[1] : undefined;
    if (tnx === 'error' && lostConnection(err)) {
      if (session !== undefined) {
        if (lost.has(session)) return;
        lost.add(session);
        // the second report comes right after the first, though another session's may come between
        if (lost.size > 64) lost.delete(lost.values().next().value as string);
      }
      const client = err.remoteAddress && normalizeIp(err.remoteAddress);
      intakeLog.info({ event: 'smtp.connection_lost', session, client, code: err.code }, 'client connection lost');
    } else if (tnx === 'error' && clientTlsFailure(err)) {
      if (logged.has(err)) return;
      logged.add(err);
      const client = err.remoteAddress && normalizeIp(err.remoteAddress);
      intakeLog.info({ event: 'smtp.tls_failed', session, client, code: err.code, reason: err.reason }, 'TLS with the client failed');
    } else if (tnx === 'punycode') {
      // a client's address that cannot be decoded: its 501 is in the session's line
      methods.debug(entry, ...rest);
    } else {
      error(entry, ...rest);
    }
  };
  return methods;
}

/** How many of a session's refusals and stored messages its closing log line lists (it counts all of them). */
const MAX_LISTED = 10;

export class SmtpIntake {
  readonly server: RelayqSmtpServer;
  private closing = false;
  /** Messages being received (DATA started) or being committed; shutdown waits for them. */
  private inFlight = 0;
  /** Shutdown's grace period is over: a message received now is not stored any more. */
  private graceOver = false;
  /** Writes of messages sent to the writer and not yet answered to their clients. */
  private readonly commitsInFlight = new Set<Promise<void>>();
  private readonly sessions = new WeakMap<SMTPServerSession, SessionState>();
  /** Sessions begun (onConnect) whose onClose has not come yet. */
  private readonly openSessions = new Set<SMTPServerSession>();
  /** Slowed answers to logins from addresses that failed lately (login-throttle.ts). */
  private readonly logins = new LoginThrottle();
  private readonly allowed: (ip: string | undefined) => boolean;
  /** Any address may connect (allowLocalOnly=false, no allowedNetworks): each is held to MAX_CONNECTIONS_PER_CLIENT. */
  private readonly limitPerClient: boolean;
  /** Loopback clients may send without AUTH when requireAuth is on but no credentials are set. */
  private readonly credentialsConfigured: boolean;
  private listening = false;
  /** Where the part of a message beyond `spoolAfter` bytes waits for its commit. */
  private readonly spool: Spool;
  /** Messages (or MAILs) answered 451 because storing failed, since this process started: /metrics. */
  private storeFailures = 0;
  /** Connections turned away at maxConnections, or over MAX_CONNECTIONS_PER_CLIENT from one address, since this process started (/metrics), and the log's count of them. */
  private connectionLimitRefusals = 0;
  private connectionLimitLogged = { count: 0, at: Number.NEGATIVE_INFINITY };

  constructor(private readonly deps: IntakeDeps) {
    const { config } = deps;
    this.allowed = clientFilter(config.security);
    this.limitPerClient = !config.security.allowLocalOnly && config.security.allowedNetworks.length === 0;
    this.credentialsConfigured = Boolean(config.defaultUsername && config.defaultPassword);
    this.spool = new Spool(Spool.dirFor(realDatabasePath(config.databasePath)), config.spoolAfter);
    const tlsOn = Boolean(deps.tls);
    // smtp-server's per-session chatter only at debug; never louder than the root logger
    const smtpLog = deps.logger.child({});
    if (deps.logger.level === 'info') smtpLog.level = 'warn';
    // smtp-server wraps the logger it is given so that every command and reply builds a log
    // entry before the level is looked at; it gets the levels that are on, and no-ops. It masks
    // the relay's secrets, and defaultUsername when that holds one (credentialSecrets).
    const serverLog = smtpServerLogger(smtpLog, deps.logger, credentialSecrets(config.defaultUsername, configSecrets(config)));
    this.server = new RelayqSmtpServer({
      name: config.serverName,
      banner: 'relayq',
      size: config.maxMessageSize,
      rejectOversized: true,
      maxClients: config.maxConnections,
      authMethods: ['PLAIN', 'LOGIN'],
      authOptional: true,
      allowInsecureAuth: true,
      disableReverseLookup: true,
      // replies still reach a client that half-closed after its last command (server.ts, 8)
      allowHalfOpen: true,
      hideENHANCEDSTATUSCODES: false,
      hidePIPELINING: false,
      hide8BITMIME: false,
      hideSMTPUTF8: false,
      hideDSN: true,
      hideREQUIRETLS: true,
      hideSTARTTLS: !tlsOn,
      // without tls.* smtp-server would upgrade with its built-in certificate, whose private key
      // is public, and the session would then count as secure for AUTH (no 538)
      // and smtp-server's jokes, which are no SMTP: WIZ answered 200, a code RFC 5321 has not
      disabledCommands: [...(tlsOn ? [] : ['STARTTLS']), 'WIZ', 'SHELL', 'KILL'],
      ...deps.tls,
      logger: serverLog as never,
      onConnect: (session, cb) => this.onConnect(session, cb),
      onAuth: (auth, session, cb) => this.onAuth(auth, session, cb),
      onMailFrom: (address, session, cb) => this.onMailFrom(address, session, cb),
      onRcptTo: (address, session, cb) => this.onRcptTo(address, session, cb),
      onData: (stream, session, cb) => this.onData(stream, session, cb),
      onClose: (session) => this.onClose(session),
    } as ConstructorParameters<typeof RelayqSmtpServer>[0], {
      plaintextAuth: (session) => isLoopback(this.peer(session)),
      onRefusal: (session, text) => this.onRefusal(session, text),
      onConnectionLimit: () => this.refusedByConnectionLimit(),
      onSizeRefused: (session, sender, declared) =>
        deps.logger.info(
          { event: 'smtp.refused', session: session.id, reason: 'size', declared, sender: decodeIdnDomain(sender), client: this.peer(session) },
          'message too large (SIZE on MAIL FROM)',
        ),
      // Only with credentials to check: a client that logs in whenever AUTH is offered
      // (nodemailer, Postfix with smtp_sasl_auth_enable) would otherwise get 535 for every
      // message on a relay that takes loopback mail without AUTH.
      authEnabled: this.credentialsConfigured,
    });
    this.server.logger = serverLog as unknown as RelayqSmtpServer['logger'];
    this.server.on('error', (err) => {
      // before listening: the listen failed, which the start reports (relay.start_failed)
      if (!this.listening) return;
      // a client that went away, or whose TLS failed: already logged (smtpServerLogger)
      if (!lostConnection(err) && !clientTlsFailure(err)) deps.logger.warn({ event: 'smtp.error', err: err.message }, 'smtp error');
    });
  }

  /**
   * Listens, then empties the spool directory (what a crashed process left), before the first
   * session. No other relay runs on this database: its lock was taken first (lockDatabase).
   */
  listen(port: number, host: string): Promise<{ address: string; port: number }> {
    return new Promise((resolve, reject) => {
      const onError = (err: Error) => reject(err);
      this.server.server.once('error', onError);
      this.server.listen(port, host, () => {
        this.server.server.off('error', onError);
        try {
          const left = this.spool.clear();
          if (left.entries > 0) {
            this.deps.logger.info(
              { event: 'smtp.spool_cleared', dir: this.spool.dir, files: left.entries, bytes: left.bytes },
              'removed the spool files of messages cut off by an earlier stop (none of them was answered 250)',
            );
          }
        } catch (err) {
          this.server.server.close();
          return reject(err);
        }
        this.listening = true;
        const addr = this.server.server.address();
        resolve(typeof addr === 'object' && addr ? { address: addr.address, port: addr.port } : { address: host, port });
      });
    });
  }

  get isListening(): boolean {
    return this.listening && this.server.server.listening;
  }

  get storeFailureCount(): number {
    return this.storeFailures;
  }

  get connectionLimitCount(): number {
    return this.connectionLimitRefusals;
  }

  /** A connection turned away by maxConnections or MAX_CONNECTIONS_PER_CLIENT: counted, and logged as noteConnectionLimit says. */
  private refusedByConnectionLimit(): void {
    this.connectionLimitRefusals++;
    this.noteConnectionLimit();
  }

  /**
   * At most once a minute, at warn: how many connections the connection limits turned away since
   * the last line (the first of a flood at once; those after it with the next connection, turned
   * away or let in, a minute later, or at the stop: `final`). Each also has its smtp.session line,
   * at info.
   */
  private noteConnectionLimit(final = false): void {
    const now = this.deps.clock.now();
    const { count, at } = this.connectionLimitLogged;
    const refused = this.connectionLimitRefusals - count;
    if (refused === 0 || (!final && Math.abs(now - at) < CONNECTION_LIMIT_LOG_MS)) return;
    this.deps.logger.warn(
      { event: 'smtp.connection_limit', refused, maxConnections: this.deps.config.maxConnections, maxPerClient: MAX_CONNECTIONS_PER_CLIENT },
      'connections over maxConnections, or over maxPerClient from one address, were turned away with 421 4.7.0',
    );
    this.connectionLimitLogged = { count: this.connectionLimitRefusals, at: now };
  }

  /** Why messages over spoolAfter get 451 (a spool file failed in the last `withinMs`, none written since), for /health. */
  spoolFault(withinMs: number): string | undefined {
    return this.spool.fault(withinMs);
  }

  /**
   * Stops taking mail: new connections and new transactions (`MAIL`) get `421 4.3.2`, messages
   * already in DATA finish (their commits complete) within `graceMs`, then every session left gets
   * `421 4.3.2` and is disconnected. A message whose commit has begun gets its answer first, even
   * after the grace period: told `421`, its client would send again a message that the commit
   * stores all the same. The listener stays open, answering `421`, until close().
   */
  async shutdown(graceMs: number): Promise<void> {
    this.closing = true;
    this.noteConnectionLimit(true);
    // on the monotonic clock: a stepped wall clock must neither cut the grace period short nor lengthen it
    const deadline = performance.now() + graceMs;
    while (this.inFlight > 0 && performance.now() < deadline) await sleep(10, undefined, { ref: false });
    this.graceOver = true;
    if (this.commitsInFlight.size > 0) {
      this.deps.logger.info({ event: 'smtp.shutdown_commits', commits: this.commitsInFlight.size }, 'shutdown: waiting for messages being committed');
      await Promise.allSettled(this.commitsInFlight);
    }
    for (const connection of this.server.connections) connection.send(421, SHUTTING_DOWN);
  }

  /** After shutdown(), once the relay has nothing left to do: the listener closes. */
  async close(): Promise<void> {
    await new Promise<void>((resolve) => {
      this.server.close(() => resolve());
      // smtp-server waits for idle clients; tell them to go away
      for (const connection of this.server.connections) {
        connection.send(421, SHUTTING_DOWN);
      }
    });
    this.listening = false;
    // smtp-server calls onClose a turn after a socket has closed, and its close() may call back
    // before that (a connection it closed leaves its set at once): the session lines are waited
    // for (a moment at most, on timers that keep the process up meanwhile), so that they come
    // before the relay's last lines
    const deadline = performance.now() + SESSION_LINES_WAIT_MS;
    while (this.openSessions.size > 0 && performance.now() < deadline) await sleep(5);
    // no session is left, and every commit has read its file: what remains belongs to messages
    // cut off at the end of the grace period, whose removal may still be under way
    try {
      this.spool.clear();
    } catch {
      // the next start empties it
    }
  }

  private peer(session: SMTPServerSession): string {
    return this.deps.peerAddress ? this.deps.peerAddress(session) : normalizeIp(session.remoteAddress);
  }

  private state(session: SMTPServerSession): SessionState {
    let s = this.sessions.get(session);
    if (!s) {
      s = {};
      this.sessions.set(session, s);
    }
    return s;
  }

  private onRefusal(session: SMTPServerSession, text: string) {
    const s = this.state(session);
    if (s.closed) return; // not sent to anyone
    s.refusedCount = (s.refusedCount ?? 0) + 1;
    if (s.refusedCount <= MAX_LISTED) (s.refused ??= []).push(text);
  }

  /** One line per session, as Postfix's "disconnect from": who it was, what it got stored, what was refused. */
  private onClose(session: SMTPServerSession) {
    this.openSessions.delete(session);
    const s = this.state(session);
    s.closed = true;
    // a session that leaves while its MAIL waits for pacing gives up its place
    s.pacing?.cancel();
    const logLine = () =>
      this.deps.logger.info(
        {
          event: 'smtp.session',
          session: session.id,
          client: this.peer(session),
          helo: session.hostNameAppearsAs || undefined,
          user: authUserOf(session) ?? undefined,
          // as Postfix logs a TLS session: protocol and cipher (after STARTTLS)
          ...(session.tlsOptions ? { tls: `${session.tlsOptions.version} ${session.tlsOptions.name}` } : {}),
          // Postfix's "lost connection after STARTTLS": no TLS session followed the 220 (none begun, or failed)
          ...(tlsNotCompleted(session) ? { tls: 'not completed' } : {}),
          accepted: s.accepted ?? 0,
          ...(s.queueIds ? { queueIds: s.queueIds } : {}),
          refused: s.refusedCount ?? 0,
          ...(s.refused ? { replies: s.refused } : {}),
          ...(s.lostInData ? { lostInData: s.lostInData } : {}),
        },
        'session closed',
      );
    // a client that left while its message was being committed: the line says whether it was stored
    if (s.committing) s.committing.then(logLine, logLine);
    else logLine();
  }

  private onConnect(session: SMTPServerSession, cb: Callback) {
    this.openSessions.add(session);
    if (this.closing) return cb(shuttingDown());
    const client = this.peer(session);
    // A client that reset the connection at once (a TCP health check, a port scan) is gone before
    // it is served, and its address with it (smtp.connection_lost says so): not a refused client.
    if (client === '') {
      this.state(session).closed = true;
      return cb(reply(421, '4.4.2 Connection lost'));
    }
    if (!this.allowed(client)) {
      this.deps.logger.warn({ event: 'smtp.refused', session: session.id, reason: 'not-allowed', client }, 'client not allowed');
      return cb(reply(554, '5.7.1 Access denied: client not allowed'));
    }
    // one client may not take every connection, as with Postfix's smtpd_client_connection_count_limit,
    // which exempts mynetworks: here loopback and allowedNetworks (behind a NAT, a container's
    // published port, every client has the gateway's address)
    if (this.limitPerClient && !isLoopback(client) && this.sessionsFrom(client) > MAX_CONNECTIONS_PER_CLIENT) {
      this.refusedByConnectionLimit();
      return cb(reply(421, `4.7.0 Too many connections from ${client}, try again later`));
    }
    // the refusals not yet told of are told at the first connection let in a minute after the last line
    if (this.connectionLimitRefusals !== this.connectionLimitLogged.count) this.noteConnectionLimit();
    cb();
  }

  /** Open sessions from `client`, the one connecting included. */
  private sessionsFrom(client: string): number {
    let n = 0;
    for (const session of this.openSessions) if (this.peer(session) === client) n++;
    return n;
  }

  private onAuth(auth: SMTPServerAuthentication, session: SMTPServerSession, cb: (err: Error | null | undefined, response?: { user?: unknown }) => void) {
    // Only secure or loopback sessions get here: the listener answers AUTH from the others with
    // 538 before any credential is sent (the plaintextAuth policy given to RelayqSmtpServer).
    const ip = this.peer(session);
    const client = authClientKey(ip);
    const { defaultUsername, defaultPassword } = this.deps.config;
    // both compared every time: a wrong user name takes as long as a wrong password
    const userOk = secretsEqual(auth.username ?? '', defaultUsername);
    const passwordOk = secretsEqual(auth.password ?? '', defaultPassword);
    // AUTH PLAIN may ask to act as someone else (RFC 4616's authzid): no user here may, so such a
    // request fails (RFC 4616, 2) rather than being granted as the user who logged in
    const authzid = (auth as { authzid?: string }).authzid ?? '';
    const ok = this.credentialsConfigured && userOk && passwordOk && (authzid === '' || authzid === auth.username);
    // After failures from this address every answer to it comes more and more slowly (never a
    // lockout), a success too: a guesser that hangs up when no quick answer comes learns nothing.
    const now = this.deps.clock.now();
    const failed = this.logins.recentFailures(client, now);
    // the name the session goes by (logs, the stored message's auth_user, the API): not a secret
    const user = this.loggedUser(auth.username);
    // No failure to hide a right guess among: answered at once, and logins that arrive together
    // (a connection pool starting) do not slow each other down.
    if (ok && failed === 0) return cb(null, { user });
    // Each held-back answer waits on its own connection: a guesser with many connections would get
    // as many answers per delay. Beyond MAX_AUTH_WAITING held back for its address, a login waits
    // its turn before it is looked at or counted. One whose client has hung up, or shut down its
    // side (FIN) or sent more meanwhile, would spend a turn on an answer it may never read: it is
    // told to come back later (RFC 4954's temporary failure), without being looked at.
    const gone = () => this.state(session).closed === true;
    const retry = () => (inputAhead(session) ? cb(reply(454, '4.7.0 Temporary authentication failure, try again later')) : this.onAuth(auth, session, cb));
    if (!this.logins.hold(client, gone, retry)) return;
    const replyInMs = this.logins.delayMs(failed);
    this.logins.failed(client, failed + 1, now);
    const answerLater = (answer: () => void) =>
      setTimeout(() => {
        try {
          answer();
        } finally {
          this.logins.answered(client);
        }
      }, replyInMs).unref();
    if (ok) {
      this.deps.logger.warn({ event: 'smtp.auth_slowed', session: session.id, client: ip, user, failures: failed, replyInMs }, 'right login after failures from this address: answered late');
      return answerLater(() => {
        if (gone()) return;
        // A client that sent its FIN or more input before the slowed answer may have hung up
        // and never read it: the login is answered and still counts as a failure.
        if (!inputAhead(session)) this.logins.succeeded(client);
        cb(null, { user });
      });
    }
    this.deps.logger.warn({ event: 'smtp.auth_failed', session: session.id, client: ip, user, failures: failed + 1, replyInMs }, 'authentication failed');
    answerLater(() => cb(reply(535, '5.7.8 Authentication credentials invalid')));
  }

  /**
   * A user name as logged and stored: one that holds the password (a token used as both, or a
   * client that typed the password as or into its user name), or another secret of the relay's
   * (the admin token or the upstream's password, pasted as a user name, or part of the configured
   * one), is not written out.
   */
  private loggedUser(user: string | null | undefined): string | undefined {
    if (!user) return undefined;
    return holdsSecret(user, configSecrets(this.deps.config)) ? '[redacted]' : user;
  }

  private onMailFrom(path: SMTPServerAddress, session: SMTPServerSession, cb: Callback) {
    // smtp-server sets the flag when MAIL carries SMTPUTF8 and clears it only at RSET or EHLO,
    // so a MAIL refused with it would leave it set for the next MAIL without it
    session.envelope.smtpUtf8 = path.args !== false && Boolean(path.args.SMTPUTF8);
    if (this.closing) return cb(shuttingDown());
    const { config } = this.deps;
    if (config.security.requireAuth && !session.user && (this.credentialsConfigured || !isLoopback(this.peer(session)))) {
      return cb(reply(530, '5.7.0 Authentication required'));
    }
    const refused = refusedPath(path, session.envelope.smtpUtf8, true);
    if (refused) return cb(refused);
    // as the sender is stored and logged once the message is in: an xn-- domain decoded
    const address = decodeIdnDomain(path.address);
    const declared = Number(path.args !== false && path.args.SIZE) || 0;
    const refusal = this.roomFor(session, address, declared);
    if (refusal) return cb(refusal);
    // In-flow pacing: mail that may be accepted waits while delivery is behind. The room is looked
    // at again after the wait (up to inFlowDelay, in which the queue may have filled or the sender
    // reached its limit), so that a refusal still comes before the client sends its message.
    const paced = this.deps.inFlow.admit();
    if (!paced) return this.mailAccepted(session, cb);
    const s = this.state(session);
    s.pacing = paced;
    let answered = false;
    const answer = () => {
      if (answered) return;
      answered = true;
      s.pacing = undefined;
      stopWatching();
      if (this.closing) return cb(shuttingDown());
      const late = this.roomFor(session, address, declared);
      if (late) cb(late);
      else this.mailAccepted(session, cb);
    };
    // A client that shuts down its side (FIN) after its MAIL sends no message: it gives up its
    // place at once (the connection stays open until the MAIL is answered), as one that hangs up.
    const stopWatching = whenInputEnds(session, () => {
      paced.cancel();
      answer();
    });
    paced.then(answer);
  }

  /**
   * Whether a message from `address` may be taken now: free disk space (weighing a declared SIZE),
   * queueSize and the rate limits. The insert's transaction checks the last two again, with no
   * other write between check and insert.
   */
  private roomFor(session: SMTPServerSession, address: string, declared: number): Error | undefined {
    const { config, sqlite, clock, disk } = this.deps;
    if (disk.isLow(declared)) {
      const why = disk.readError ? 'free disk space cannot be read' : disk.isLow() ? 'disk space low' : 'its declared SIZE would take free disk space below minFreeDiskMb';
      this.deps.logger.warn(
        { event: 'smtp.disk_low', session: session.id, client: this.peer(session), sender: address, freeMb: disk.freeMb(), size: declared || undefined, err: disk.readError },
        `refusing mail: ${why}`,
      );
      // a write so small that it may fit still; one that does not says nothing more
      this.deps.writer.write('countRefusal', 'disk-low').catch(() => {});
      return reply(452, '4.3.1 Insufficient system storage, try again later');
    }
    let full: boolean;
    let hit: LimitHit | undefined;
    try {
      full = isQueueFull(sqlite, config.queueSize);
      hit = full ? undefined : checkRateLimits(sqlite, address, clock.now(), config.rateLimits);
    } catch (err) {
      // the database cannot be read: what storing the message would run into
      this.deps.logger.error(
        { event: 'smtp.store_failed', session: session.id, client: this.peer(session), sender: address, err: storeError(err) },
        'reading the queue size and rate limits failed',
      );
      return this.notStored();
    }
    if (full || hit) return this.policyRefused(session, address, hit);
    return undefined;
  }

  /** Storing a message failed: logged, and the reply that says nothing was stored. */
  private storeFailed(session: SMTPServerSession, queueId: string, err: unknown) {
    this.deps.logger.error({ queueId, event: 'smtp.store_failed', session: session.id, err: storeError(err) }, 'storing the message failed');
    return this.notStored();
  }

  /** Storage write failed (spec §2): nothing was stored. Counted for /metrics. */
  private notStored() {
    this.storeFailures++;
    return reply(451, '4.3.0 Local error in processing: message not stored, try again later');
  }

  private mailAccepted(session: SMTPServerSession, cb: Callback) {
    this.state(session).queueId = newQueueId(this.deps.clock.now());
    cb();
  }

  /**
   * maxRecipients counts recipients as they are stored: two spellings of one address (`xn--` and
   * Unicode, or in another case) are one recipient, and a repeated one takes no second place.
   */
  private onRcptTo(path: SMTPServerAddress, session: SMTPServerSession, cb: Callback) {
    const refused = refusedPath(path, session.envelope.smtpUtf8 === true, false);
    if (refused) return cb(refused);
    const s = this.state(session);
    const listed = session.envelope.rcptTo;
    if (s.recipients?.of !== listed) {
      s.recipients = { of: listed, keys: new Set(listed.map((r) => addressKey(r.address))), spelled: new Map(listed.map((r) => [r.address.toLowerCase(), r.address])) };
    }
    const key = addressKey(path.address);
    const { keys, spelled } = s.recipients;
    // smtp-server merges recipients equal in lower case; `BOB@ΑΣ-1.GR` (ασ-1.gr) and `bob@ας-1.gr` are
    // two addresses that it would merge into one, losing the first: the second is refused
    const lower = path.address.toLowerCase();
    if (!keys.has(key) && spelled.has(lower)) {
      return cb(reply(550, '5.1.3 Error: another recipient of this message differs from this one only in case; send it in a message of its own'));
    }
    const max = this.deps.config.maxRecipients;
    if (keys.size >= max && !keys.has(key)) return cb(reply(452, '4.5.3 Error: too many recipients'));
    keys.add(key);
    if (!spelled.has(lower)) spelled.set(lower, path.address);
    cb();
  }

  private onData(stream: SMTPServerDataStream, session: SMTPServerSession, cb: (err?: Error | null, message?: string) => void) {
    // the id of this message (given at MAIL) names its spool file, its log lines and its row
    const s = this.state(session);
    const queueId = s.queueId ?? newQueueId(this.deps.clock.now());
    s.queueId = undefined;
    const body = new MessageBytes(this.spool, queueId, stream);
    const scanner = new BareLineEndingScanner();
    const hops = new ReceivedHeaderCounter();
    this.inFlight++;
    let settled = false;
    const done = (err?: Error | null, message?: string) => {
      if (settled) return;
      settled = true;
      this.inFlight--;
      body.discard();
      cb(err, message);
    };
    stream.on('close', () => {
      // the client went away mid-DATA: nothing to store, nothing to answer
      if (stream.readableEnded) return;
      s.lostInData = { queueId, bytes: stream.byteLength };
      done(reply(451, '4.3.0 Connection lost'));
    });
    stream.on('data', (chunk: Buffer) => {
      if (stream.sizeExceeded) return;
      scanner.scan(chunk);
      hops.scan(chunk);
      if (!scanner.found) body.add(chunk);
    });
    stream.on('end', () => {
      const log = this.deps.logger;
      if (stream.sizeExceeded) {
        // stream.byteLength: every byte of the DATA, also those after the limit that were not kept
        log.info({ queueId, event: 'smtp.refused', session: session.id, reason: 'size', bytes: stream.byteLength, client: this.peer(session) }, 'message too large');
        // the client reads smtp-server's own reply (rejectOversized): `552 5.3.4 Error: message
        // exceeds fixed maximum message size N`; this one ends the transaction, nothing stored
        return done(reply(552, '5.3.4 Message size exceeds fixed maximum message size'));
      }
      if (scanner.finish()) {
        log.warn({ queueId, event: 'smtp.refused', session: session.id, reason: 'bare-line-ending', client: this.peer(session) }, 'bare CR or LF in DATA');
        return done(reply(550, '5.6.0 Bare CR or LF in message data is not allowed (RFC 5321 section 2.3.8)'));
      }
      if (hops.count + 1 > MAX_RECEIVED_HEADERS) {
        log.warn({ queueId, event: 'smtp.refused', session: session.id, reason: 'mail-loop', received: hops.count, client: this.peer(session) }, 'too many Received: headers: a mail loop');
        return done(reply(554, `5.4.6 Too many hops: ${hops.count} Received: header fields, a mail loop`));
      }
      // from here on a client that leaves is logged once the message is stored or refused: also
      // while a spooled message's last bytes are still being written, before its commit begins
      const committing: Promise<void> = body
        .finish()
        .then((received) => this.commitAndAnswer(session, queueId, received, hops.startsFolded, done))
        .catch((err: Error) => done(this.storeFailed(session, queueId, err)));
      s.committing = committing;
      committing.finally(() => {
        if (s.committing === committing) s.committing = undefined;
      });
    });
  }

  /**
   * Commits the message; `cb` (which removes its spool file) runs once the write has settled.
   * Resolves when the client has been answered.
   */
  private async commitAndAnswer(
    session: SMTPServerSession,
    queueId: string,
    received: ReceivedBytes,
    startsFolded: boolean,
    cb: (err?: Error | null, message?: string) => void,
  ): Promise<void> {
    if (this.graceOver) return cb(shuttingDown());
    const { config, clock, writer } = this.deps;
    const log = this.deps.logger;
    const mailFrom = session.envelope.mailFrom ? decodeIdnDomain(session.envelope.mailFrom.address) : '';
    // smtp-server merged the recipients that differ only in case, keeping the place of the first
    // and the spelling of the last: the first's is taken back; two spellings of one xn-- domain
    // meet only here, once decoded
    const state = this.state(session);
    const counted = state.recipients;
    const spelled = counted?.of === session.envelope.rcptTo ? counted.spelled : undefined;
    const recipients = uniqueAddresses(session.envelope.rcptTo.map((r) => decodeIdnDomain(spelled?.get(r.address.toLowerCase()) ?? r.address)));
    const clientIp = this.peer(session);
    const now = clock.now();
    // RFC 3848 and RFC 6531 §3.7.3: SMTP after HELO, ESMTP after EHLO, UTF8SMTP with SMTPUTF8;
    // UTF8, S (TLS) and A (AUTH) are registered for ESMTP only, so a HELO session is SMTP (also
    // when its client used SMTPUTF8, which smtp-server takes after HELO too)
    const base = session.openingCommand === 'HELO' ? 'SMTP' : session.envelope.smtpUtf8 ? 'UTF8SMTP' : 'ESMTP';
    const protocol = base === 'SMTP' ? base : `${base}${session.secure ? 'S' : ''}${session.user ? 'A' : ''}`;
    const helo = session.hostNameAppearsAs || null;
    const header = receivedHeader({
      helo,
      clientIp,
      serverName: config.serverName,
      protocol,
      queueId,
      recipients,
      now,
      endHeaderSection: startsFolded,
    });
    const { chunks, spooled } = received;
    const raw = Buffer.concat([header, ...chunks]);
    chunks.length = 0;
    // what the log line needs, taken before the bytes move to the writer thread
    const size = raw.length + (spooled?.bytes ?? 0);
    const subject = config.security.logAllEmails ? subjectOf(raw) : undefined;
    const authUser = authUserOf(session);
    const write = writer.writeMoving(
      [raw],
      'insertMessage',
      { id: queueId, mailFrom, recipients, authUser, clientIp, helo, smtpUtf8: session.envelope.smtpUtf8 === true, raw, spooled, receivedAt: now },
      { rateLimits: config.rateLimits, queueSize: config.queueSize },
    );

    const answered = write.then(
      () => {
        log.info(
          {
            queueId,
            event: 'smtp.accepted',
            session: session.id,
            from: mailFrom,
            to: recipients.slice(0, MAX_LISTED), // `rcpts` counts them all
            rcpts: recipients.length,
            size,
            client: clientIp,
            user: authUser ?? undefined,
            ...(subject !== undefined ? { subject } : {}),
          },
          'message queued',
        );
        this.deps.disk.noteStored(size);
        state.accepted = (state.accepted ?? 0) + 1;
        if (state.accepted <= MAX_LISTED) (state.queueIds ??= []).push(queueId);
        cb(null, `2.0.0 Ok: queued as ${queueId}`);
      },
      (err: unknown) => {
        // checked at MAIL FROM, but another session's message may have come first
        if (err instanceof PolicyRefusal) return cb(this.policyRefused(session, mailFrom, err.hit, queueId));
        cb(this.storeFailed(session, queueId, err));
      },
    );
    this.commitsInFlight.add(answered);
    answered.finally(() => this.commitsInFlight.delete(answered));
    return answered;
  }

  /**
   * A refusal by policy: a rate limit `hit`, else a full queue. Counted and logged, with the
   * message's `queueId` when it comes at the end of DATA (another session's message came first).
   */
  private policyRefused(session: SMTPServerSession, sender: string, hit?: LimitHit, queueId?: string): Error {
    this.deps.writer.write('countRefusal', hit ? 'rate-limit' : 'queue-full').catch(() => {});
    const who = { ...(queueId ? { queueId } : {}), session: session.id, client: this.peer(session), sender };
    if (!hit) {
      this.deps.logger.warn({ event: 'smtp.queue_full', ...who, queueSize: this.deps.config.queueSize }, 'queue full: mail refused');
      return reply(452, '4.3.1 Queue full, try again later');
    }
    this.deps.logger.warn({ event: 'smtp.rate_limited', ...who, limit: hit.limit, count: hit.count, max: hit.max }, 'rate limit reached');
    return reply(451, `4.7.1 ${rateLimitMessage(hit)}, try again later`);
  }
}

/** The addresses in order, each once by addressKey (the first spelling stays). */
function uniqueAddresses(addresses: string[]): string[] {
  const seen = new Set<string>();
  return addresses.filter((address) => {
    const key = addressKey(address);
    if (seen.has(key)) return false;
    seen.add(key);
    return true;
  });
}

/** The name the session authenticated as (onAuth hands smtp-server the username), or null. */
function authUserOf(session: SMTPServerSession): string | null {
  return typeof session.user === 'string' && session.user !== '' ? session.user : null;
}
