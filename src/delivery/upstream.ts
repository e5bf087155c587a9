// The upstream SMTP relay ("smart host"): one pooled nodemailer transport, reused connections,
// the original envelope sender and the stored bytes unchanged. Every timeout is below the claim
// lease, and an attempt that outlives its deadline is aborted (its connection closed), so a
// stalled upstream can never hold a batch past its lease.
import type tls from 'node:tls';
import nodemailer, { type Mail } from 'nodemailer';
import MimeNode from 'nodemailer/lib/mime-node';
import type { Logger } from 'pino';
import type { ClaimedBatch } from '../store/delivery.js';
import { type BatchResult, resultFromNodemailer, uniformResult } from './outcomes.js';

export interface UpstreamSettings {
  host: string;
  port: number;
  /** Implicit TLS (port 465 style); otherwise STARTTLS whenever the upstream offers it. */
  secure: boolean;
  username: string;
  password: string;
  /** Our name in EHLO. */
  clientName: string;
  maxConnections: number;
  /** The whole attempt must end before this; connection-level timeouts are derived from it. */
  attemptTimeoutMs: number;
  logger: Logger;
  /** Extra tls.connect options (a private CA, for instance). Certificates are verified. */
  tls?: tls.ConnectionOptions;
}

/** nodemailer writes the RCPT commands with normalized addresses (lower-case, punycoded domain). */
function normalizeForRcpt(address: string): string {
  return new MimeNode().setEnvelope({ from: '', to: [address] }).getEnvelope().to[0] ?? address;
}

/** 8-bit bytes in the message: announce BODY=8BITMIME when the upstream offers it. */
function hasEightBitBytes(raw: Buffer): boolean {
  for (let i = 0; i < raw.length; i++) if (raw[i] > 127) return true;
  return false;
}

export class SmtpUpstream {
  readonly label: string;
  private readonly transport: Mail;

  constructor(settings: UpstreamSettings) {
    this.label = `${settings.host}:${settings.port}`;
    const budget = settings.attemptTimeoutMs;
    const setupTimeout = Math.min(30_000, Math.max(1000, Math.floor(budget / 3)));
    // nodemailer logs every session step at info and every refused message at error; relayq's
    // own `delivery.attempt` line carries the same facts once, so its log is for debugging only.
    const transportLogger = settings.logger.child({ component: 'upstream' });
    if (!settings.logger.isLevelEnabled('debug')) transportLogger.level = 'silent';
    this.transport = nodemailer.createTransport({
      pool: true,
      host: settings.host,
      port: settings.port,
      secure: settings.secure,
      // STARTTLS is used whenever offered (nodemailer's default); a certificate that does not
      // verify is a TLS error (retried), never a silent fallback to plain text.
      ignoreTLS: false,
      requireTLS: false,
      tls: { ...settings.tls },
      name: settings.clientName,
      auth: settings.username ? { user: settings.username, pass: settings.password } : undefined,
      maxConnections: settings.maxConnections,
      connectionTimeout: setupTimeout,
      greetingTimeout: setupTimeout,
      dnsTimeout: setupTimeout,
      // inactivity on an open connection; the attempt deadline bounds the whole transaction
      socketTimeout: Math.min(120_000, budget),
      logger: transportLogger as never,
      // nodemailer 10 sets TCP_NODELAY on every socket it opens (smtp-connection _onConnect), so
      // the final "." is not held back by Nagle's algorithm waiting for a delayed ACK.
    });
    this.transport.on('error', (err: Error) =>
      settings.logger.warn({ event: 'delivery.transport_error', upstream: this.label, err: err.message }, 'upstream transport error'),
    );
  }

  /** One SMTP transaction for the batch; never throws. `signal` aborts it and closes its connection. */
  async send(claim: ClaimedBatch, signal: AbortSignal): Promise<BatchResult> {
    const addresses = claim.recipients.map((r) => r.address);
    if (!claim.raw) return uniformResult(this.label, addresses.length, 'failed', null, 'message content is missing');
    const envelope = {
      from: claim.mailFrom,
      to: addresses,
      size: claim.raw.length,
      use8BitMime: hasEightBitBytes(claim.raw),
    };
    try {
      const info = await this.transport.sendMail({ envelope, raw: claim.raw, signal } as Parameters<Mail['sendMail']>[0]);
      return resultFromNodemailer(this.label, addresses, { info }, normalizeForRcpt);
    } catch (error) {
      return resultFromNodemailer(this.label, addresses, { error }, normalizeForRcpt);
    }
  }

  /** Closes idle connections; in-flight transactions were aborted by their signals first. */
  close(): void {
    this.transport.close();
  }
}
