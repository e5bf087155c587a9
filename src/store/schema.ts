// Rows of the SQLite schema's main tables (see migrations/) as SQLite returns them, which the
// store's queries and the tests read.

export type MessageState = 'queued' | 'sending' | 'delivered' | 'failed';
export type RecipientStatus = 'pending' | 'delivered' | 'failed';
export type AttemptOutcome = 'delivered' | 'partial' | 'deferred' | 'failed';

export const MESSAGE_STATES: readonly MessageState[] = ['queued', 'sending', 'delivered', 'failed'];
/** Whether a state filter (`--state`, `?state=`) names a state. */
export function isMessageState(value: string): value is MessageState {
  return (MESSAGE_STATES as readonly string[]).includes(value);
}

export const ATTEMPT_OUTCOMES: readonly AttemptOutcome[] = ['delivered', 'partial', 'deferred', 'failed'];

export interface MessagesTable {
  id: string;
  state: MessageState;
  mail_from: string;
  sender_key: string;
  auth_user: string | null;
  client_ip: string;
  /** NULL: relayq does no reverse lookup (rows stored by earlier builds hold `[address]`). */
  client_hostname: string | null;
  helo: string | null;
  /** 1: the client's MAIL FROM carried SMTPUTF8 (RFC 6531), which delivery makes too. */
  smtputf8: number;
  size: number;
  recipient_count: number;
  /** The row of message_bodies holding the stored bytes; NULL once erased (logAllEmails=false). */
  body_id: number | null;
  received_at: number;
  next_attempt_at: number;
  lease_token: string | null;
  lease_expires_at: number | null;
  claims: number;
  last_error: string | null;
  updated_at: number;
  finished_at: number | null;
}

export interface RecipientsTable {
  message_id: string;
  seq: number;
  address: string;
  status: RecipientStatus;
  attempts: number;
  next_attempt_at: number;
  last_code: number | null;
  last_reply: string | null;
  temporary: number;
  updated_at: number;
}

export interface AttemptsTable {
  id: number;
  message_id: string;
  batch: number;
  recipients: string;
  upstream: string;
  started_at: number;
  duration_ms: number;
  outcome: AttemptOutcome;
  code: number | null;
  reply: string | null;
}
