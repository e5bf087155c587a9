// What an upstream answer means for each recipient of a batch, and what the queue does about it.
// classifyUpstreamError decides whether an error is permanent (5xx) or temporary (4xx, network,
// TLS, timeout, AUTH), and classifyRcptRefusal takes a 552 to RCPT TO for a 452; planCompletion
// turns a transport result plus the retry policy into the fenced completion the store applies.
import type { AttemptRecord, BatchCompletion, ClaimedBatch, RecipientOutcome } from '../store/delivery.js';
import type { AttemptOutcome } from '../store/schema.js';
import { backoffDelayMs, describeGiveUp, giveUpReason, type RetrySettings } from './retry-policy.js';

export type Verdict = 'delivered' | 'failed' | 'deferred';

export interface RecipientResult {
  verdict: Verdict;
  code: number | null;
  reply: string;
}

/**
 * What one attempt produced: one local write, or one SMTP transaction and any further ones for the
 * recipients over the upstream's limit per transaction (SmtpUpstream.send).
 */
export interface BatchResult {
  /** "host:port" or "local". */
  upstream: string;
  /**
   * The first transaction's reply (its DATA reply, or the error that ended it), or that of a later
   * one that refused the batch as a whole (a 5xx to MAIL FROM or DATA, or to the last RCPTs of a
   * batch whose every recipient was refused).
   */
  code: number | null;
  reply: string;
  /** One entry per claimed recipient, same order. */
  recipients: RecipientResult[];
  /** Refused as a whole with a 5xx (MAIL FROM, DATA, or every RCPT): continueOnError=false stops here (see planCompletion). */
  permanentFailure: boolean;
  /** A 5xx to MAIL FROM or DATA (in any transaction of the batch), or an error before any RCPT: refused as a whole, not recipient by recipient. */
  refusedWhole: boolean;
  /**
   * The upstream and relayq's settings disagree: it refused forwardUsername/forwardPassword, or
   * offered no AUTH, or no TLS to send them over or that forwardRequireTLS asks for, or its
   * certificate does not verify. The settings (or the upstream) need fixing, not the mail.
   */
  settingFault?: boolean;
  /**
   * The upstream was not reached: a new connection was refused, timed out or closed before a
   * session was set up, with no reply to say why. Delivery may be suspended for a while (see
   * UpstreamSuspension).
   */
  unreachable?: boolean;
  /** Every recipient of the transaction was refused at RCPT (so it never reached DATA). */
  everyRcptRefused?: boolean;
  /**
   * The TLS version of the connection of the first transaction (`TLSv1.3`), or null in plain text;
   * absent when there was none (no connection, or no login) or for local delivery.
   */
  tls?: string | null;
}

/**
 * What an attempt says about the upstream, for `/health`'s run of failures: it delivered to at
 * least one recipient; it refused every recipient for good (a 5xx to MAIL, RCPT or DATA, or
 * relayq's own size or SMTPUTF8 check): it works, and the mail was at fault, e.g. unknown
 * addresses; or it failed otherwise (no connection, TLS, AUTH, a timeout, a 4xx, or every
 * recipient refused as relayq's own mail is: refusesRelay). Only the last makes the run longer.
 */
export type UpstreamVerdict = 'delivered' | 'refused' | 'failed';

export function upstreamVerdict(result: BatchResult): UpstreamVerdict {
  if (result.recipients.some((r) => r.verdict === 'delivered')) return 'delivered';
  if (result.recipients.every((r) => r.verdict === 'failed') && !result.recipients.every(refusesRelay)) return 'refused';
  return 'failed';
}

/**
 * A refusal of relayq rather than of the address or the message: a `5.7.x` enhanced code
 * (security or policy, RFC 3463), as in Postfix's `554 5.7.1 Relay access denied` to a relay it
 * does not know. Mail fails for good by it all the same. (A `530`, authentication required, is
 * not even that: it defers the mail, as an AUTH failure does.)
 */
function refusesRelay(r: RecipientResult): boolean {
  return /^5\d\d[ -]5\.7\.\d{1,3}\b/.test(r.reply);
}

export interface ErrorClass {
  temporary: boolean;
  code: number | null;
  reply: string;
}

/** What a reply adds when the final dot had left (withEndUnanswered in upstream.ts) and no reply to it came. */
export const END_UNANSWERED = '; no reply to the final dot: the upstream may have taken the message, and a retry may deliver it twice';

/** Errors about the message or its envelope; anything else is about the session or the network. */
const MESSAGE_ERROR_CODES = new Set(['EENVELOPE', 'EMESSAGE']);

/**
 * The one place that decides whether an upstream error is permanent. A 5xx reply to MAIL FROM,
 * RCPT TO or DATA refuses the message: permanent. Everything else is temporary: 4xx replies,
 * network and timeout errors (ECONNECTION, ETIMEDOUT, ESOCKET, EDNS, ...), TLS errors, and
 * authentication or greeting failures even with a 5xx, because a wrong password or a refusing
 * smart host says nothing about the message (Postfix's smtp_sasl_auth_soft_bounce, likewise).
 * Unknown errors are temporary: retrying is recoverable, bouncing is not.
 */
export function classifyUpstreamError(err: unknown): ErrorClass {
  const e = (err ?? {}) as {
    code?: unknown;
    responseCode?: unknown;
    response?: unknown;
    message?: unknown;
    cause?: unknown;
    reason?: unknown;
    originalCode?: unknown;
    hint?: unknown;
    endUnanswered?: unknown;
    ownRefusal?: unknown;
  };
  const code = typeof e.responseCode === 'number' && e.responseCode >= 200 && e.responseCode < 600 ? e.responseCode : null;
  const errorCode = typeof e.code === 'string' ? e.code : '';
  const response = typeof e.response === 'string' && e.response.trim() ? e.response.trim() : '';
  // An aborted attempt says why in its cause (the attempt deadline, ETIMEDOUT, or shutdown).
  const cause = errorCode === 'EABORT' && e.cause instanceof Error ? (e.cause as Error & { code?: unknown }) : undefined;
  const message = cause ? cause.message : (openSslMessage(e) ?? (typeof e.message === 'string' ? e.message : String(err)));
  const shownCode = typeof cause?.code === 'string' ? cause.code : errorCode;
  // relayq's own refusals (`5.6.7 SMTPUTF8 is required, …`) as written, their enhanced code first, as Postfix logs its dsn
  const reply = shortReply(response || (shownCode && e.ownRefusal !== true ? `${shownCode}: ${message}` : message)) + (e.endUnanswered === true ? END_UNANSWERED : '');
  const aboutMessage = MESSAGE_ERROR_CODES.has(errorCode);
  // 503 (bad sequence of commands) and 530 (authentication required: relayq has no or the
  // wrong credentials) are about the session, not the message.
  if (aboutMessage && code !== null) return { temporary: code < 500 || code === 503 || code === 530, code, reply };
  // A message error without a reply is a refusal before sending (relayq's SIZE or SMTPUTF8 check,
  // or nodemailer's, e.g. an address it cannot encode): retrying will not help. A reply that is
  // no SMTP reply (no code, or 999) refuses nothing.
  if (aboutMessage && !response) return { temporary: false, code: null, reply };
  return { temporary: true, code, reply };
}

/** The OpenSSL code of a TLS error: ERR_SSL_WRONG_VERSION_NUMBER is what a peer that does not speak TLS causes. */
export function openSslCode(e: { originalCode?: unknown; code?: unknown }): string | undefined {
  const code = typeof e.originalCode === 'string' ? e.originalCode : e.code;
  return typeof code === 'string' && code.startsWith('ERR_SSL_') ? code : undefined;
}

/**
 * An OpenSSL error says `80ACCBCB7F7F0000:error:0A00010B:SSL routines:ssl3_get_record:wrong version
 * number:ssl3_record.c:350:`, whose first field differs from process to process: its reason and
 * code instead, so that one fault reads the same every time, and the hint the connection gave it
 * (what to check, which depends on forwardSSL).
 */
function openSslMessage(e: { reason?: unknown; originalCode?: unknown; code?: unknown; hint?: unknown }): string | undefined {
  const code = openSslCode(e);
  if (typeof e.reason !== 'string' || code === undefined) return undefined;
  return `TLS ${e.reason} (${code})${typeof e.hint === 'string' ? `: ${e.hint}` : ''}`;
}

/** Replies are kept to this many characters (Postfix's line_length_limit): they are stored per recipient and logged. */
const REPLY_LIMIT = 2048;

function shortReply(text: string): string {
  // without the line end some errors carry (OpenSSL's), which `relayq show` would print as a blank
  // line; the lines of a multi-line reply joined by a space, as Postfix logs them, so that a row
  // or a log line holds one line
  const reply = text.trimEnd().replace(/\r?\n/g, ' ');
  return reply.length <= REPLY_LIMIT ? reply : `${reply.slice(0, REPLY_LIMIT)}… (${reply.length} characters)`;
}

/**
 * A refusal of one recipient at RCPT TO. RFC 5321 (4.5.3.1.10) has a client take a `552` there
 * for a `452`: servers sent it for "too many recipients", and so the recipients over an upstream's
 * limit (a batchSize above it) go in a later attempt instead of failing. Postfix does the same.
 */
function classifyRcptRefusal(err: unknown): ErrorClass {
  const c = classifyUpstreamError(err);
  return c.code === 552 ? { ...c, temporary: true } : c;
}

function replyCode(reply: string | undefined): number | null {
  const m = /^([2-5]\d\d)/.exec(reply ?? '');
  return m ? Number(m[1]) : null;
}

interface NodemailerInfo {
  /** The addresses as the RCPT commands gave them (SMTPConnection's own lists, not Mail's objects). */
  accepted?: string[];
  rejected?: string[];
  rejectedErrors?: Array<{ recipient?: string; responseCode?: number; response?: string; message?: string }>;
  response?: string;
  tls?: string | null;
}

/** Each refused recipient's refusal, by address. */
function rcptRefusals(refusals: NodemailerInfo['rejectedErrors']): Map<string, ErrorClass> {
  const byRecipient = new Map<string, ErrorClass>();
  for (const r of refusals ?? []) if (r.recipient) byRecipient.set(r.recipient, classifyRcptRefusal(r));
  return byRecipient;
}

/**
 * Per-recipient results of a nodemailer send, in batch order. `rcpts` are the addresses as they
 * were written in the RCPT commands (domain lower-cased and punycoded), the form the `accepted` /
 * `rejected` lists use.
 */
export function resultFromNodemailer(upstream: string, rcpts: readonly string[], outcome: { info: NodemailerInfo } | { error: unknown }): BatchResult {
  if ('info' in outcome) {
    const { info } = outcome;
    const accepted = new Set(info.accepted);
    const rejections = rcptRefusals(info.rejectedErrors);
    const rejected = new Set(info.rejected);
    const response = shortReply((info.response ?? '').trim());
    const code = replyCode(response);
    const recipients = rcpts.map((key): RecipientResult => {
      if (accepted.has(key)) return { verdict: 'delivered', code, reply: response };
      const rejection = rejections.get(key);
      if (rejection) return { verdict: rejection.temporary ? 'deferred' : 'failed', code: rejection.code, reply: rejection.reply };
      if (rejected.has(key)) return { verdict: 'deferred', code: null, reply: 'rejected by the upstream without a reply' };
      // Not in either list: we cannot know whether it was accepted, so it is tried again.
      return { verdict: 'deferred', code: null, reply: 'the upstream gave no reply for this recipient' };
    });
    return { upstream, code, reply: response, recipients, permanentFailure: false, refusedWhole: false, ...tlsOf(info) };
  }
  const error = outcome.error as { rejectedErrors?: NodemailerInfo['rejectedErrors']; settingFault?: unknown; unreachable?: unknown; tls?: string | null };
  const whole = classifyUpstreamError(outcome.error);
  const perRecipient = rcptRefusals(error?.rejectedErrors);
  const recipients = rcpts.map((key): RecipientResult => {
    const own = perRecipient.get(key) ?? whole;
    return { verdict: own.temporary ? 'deferred' : 'failed', code: own.code, reply: own.reply };
  });
  // Refused as a whole: MAIL FROM or DATA refused permanently (for every recipient the upstream
  // had accepted at RCPT), or every RCPT refused permanently.
  const rest = rcpts.filter((key) => !perRecipient.has(key));
  const everyRcptRefused = rest.length === 0 && rcpts.length > 0;
  const refusedWhole = rest.length > 0 && !whole.temporary;
  const permanentFailure = refusedWhole || (everyRcptRefused && recipients.every((r) => r.verdict === 'failed'));
  return {
    upstream,
    code: whole.code,
    reply: whole.reply,
    recipients,
    permanentFailure,
    refusedWhole,
    ...(error?.settingFault === true ? { settingFault: true } : {}),
    ...(error?.unreachable === true ? { unreachable: true } : {}),
    ...(everyRcptRefused ? { everyRcptRefused: true } : {}),
    ...tlsOf(error ?? {}),
  };
}

function tlsOf(source: { tls?: string | null }): { tls?: string | null } {
  return source.tls === undefined ? {} : { tls: source.tls };
}

/** The same verdict for every recipient, with no SMTP reply code: local delivery, or no content to send. */
export function uniformResult(upstream: string, count: number, verdict: Verdict, reply: string): BatchResult {
  return {
    upstream,
    code: null,
    reply,
    recipients: Array.from({ length: count }, () => ({ verdict, code: null, reply })),
    permanentFailure: verdict === 'failed',
    refusedWhole: verdict === 'failed',
  };
}

export interface CompletionContext {
  now: number;
  startedAt: number;
  durationMs: number;
  retry: RetrySettings;
  batchDelayMs: number;
  continueOnError: boolean;
  eraseRawOnDelivered: boolean;
  random: () => number;
}

/**
 * Applies the retry policy to a batch result: deferred recipients get their next time (backoff
 * with jitter) or are failed after retry.maxAttempts / retry.maxAge; a permanent refusal with
 * continueOnError=false fails the message's remaining recipients with a reason that says why.
 */
export function planCompletion(claim: ClaimedBatch, result: BatchResult, ctx: CompletionContext): BatchCompletion {
  const { now } = ctx;
  // One jitter draw per attempt: recipients deferred together (with the same attempt count) stay
  // due together and go out in one transaction again, instead of one by one as each comes due.
  const draw = ctx.random();
  // continueOnError=false: a permanent refusal fails what is left of the message, this batch's
  // deferred recipients included (the store fails those of its other batches). Every RCPT of a
  // retry refused one by one is not one when an earlier attempt of the batch delivered to others:
  // the batch was not refused, some of its recipients were.
  const failRemaining =
    result.permanentFailure && (result.refusedWhole || !claim.deliveredBefore) && !ctx.continueOnError
      ? `batch ${claim.batch} was refused permanently (${withCode(result.code, result.reply)}) and continueOnError is false`
      : undefined;
  let delivered = 0;
  let pending = 0;
  let lastFailure: string | null = null;
  let stopped = false;
  const recipients = claim.recipients.map((r, i): RecipientOutcome => {
    const res = result.recipients[i];
    const text = withCode(res.code, res.reply);
    // the attempts as the claim counted them, this one included
    const counted = { seq: r.seq, attempts: r.attempts, code: res.code };
    if (res.verdict === 'delivered') {
      delivered++;
      return { ...counted, status: 'delivered', reply: res.reply, temporary: false, nextAttemptAt: now };
    }
    if (res.verdict === 'failed') {
      lastFailure = `${r.address}: ${text}`;
      return { ...counted, status: 'failed', reply: res.reply, temporary: false, nextAttemptAt: now };
    }
    const reason = giveUpReason(r.attempts, claim.receivedAt, now, ctx.retry);
    if (reason) {
      const gaveUp = describeGiveUp(reason, r.attempts, ctx.retry);
      lastFailure = `${r.address}: ${gaveUp}; last reply: ${text}`;
      return { ...counted, status: 'failed', reply: `${res.reply} (${gaveUp})`, temporary: true, nextAttemptAt: now };
    }
    if (failRemaining) {
      stopped = true;
      const reply = `not attempted again: ${failRemaining}; last reply: ${res.reply}`;
      return { ...counted, status: 'failed', reply, temporary: false, nextAttemptAt: now };
    }
    pending++;
    return { ...counted, status: 'pending', reply: res.reply, temporary: true, nextAttemptAt: now + backoffDelayMs(r.attempts, ctx.retry, () => draw) };
  });
  const total = claim.recipients.length;
  const outcome: AttemptOutcome =
    delivered === total ? 'delivered' : delivered > 0 ? 'partial' : pending > 0 ? 'deferred' : 'failed';
  return {
    messageId: claim.messageId,
    token: claim.token,
    now,
    attempt: attemptRecord(claim, result, outcome, ctx.startedAt, ctx.durationMs),
    recipients,
    upstreamFailed: upstreamVerdict(result) === 'failed',
    batchDelayMs: ctx.batchDelayMs,
    eraseRawOnDelivered: ctx.eraseRawOnDelivered,
    lastFailure,
    failRemaining,
    stoppedInBatch: stopped,
  };
}

/** The row of `attempts` an attempt of `claim` writes. */
export function attemptRecord(claim: ClaimedBatch, result: BatchResult, outcome: AttemptOutcome, startedAt: number, durationMs: number): AttemptRecord {
  return {
    batch: claim.batch,
    recipients: claim.recipients.map((r) => r.address),
    upstream: result.upstream,
    startedAt,
    durationMs,
    outcome,
    code: result.code,
    reply: result.reply,
  };
}

/** A reply with its code in front, unless it starts with it already. */
function withCode(code: number | null, reply: string): string {
  return code !== null && !reply.startsWith(String(code)) ? `${code} ${reply}` : reply;
}
