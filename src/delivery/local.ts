// forwardSMTP=false: "delivery" writes the stored bytes to emailsDir/<queue id>.eml, atomically.
// The queue id is unique, so two messages never share a file; a repeated delivery of the same
// message (a crash between the write and the commit) replaces its own file with the same bytes.
import path from 'node:path';
import type { ClaimedBatch } from '../store/delivery.js';
import { writeFileAtomic } from './atomic-file.js';
import { type BatchResult, uniformResult } from './outcomes.js';

export const LOCAL_UPSTREAM = 'local';

/** Queue ids are hex; anything else must not become a path. */
export function safeFileStem(id: string): string {
  if (!/^[A-Za-z0-9][A-Za-z0-9_-]*$/.test(id)) throw new Error(`unsafe message id for a file name: ${JSON.stringify(id)}`);
  return id;
}

function emlPath(emailsDir: string, id: string): string {
  return path.join(emailsDir, `${safeFileStem(id)}.eml`);
}

export async function deliverLocally(emailsDir: string, claim: ClaimedBatch): Promise<BatchResult> {
  const count = claim.recipients.length;
  if (!claim.raw) return uniformResult(LOCAL_UPSTREAM, count, 'failed', 'message content is missing');
  let file: string;
  try {
    file = emlPath(emailsDir, claim.messageId);
  } catch (err) {
    return uniformResult(LOCAL_UPSTREAM, count, 'failed', (err as Error).message);
  }
  try {
    await writeFileAtomic(file, claim.raw);
  } catch (err) {
    // Disk full, permissions: the operator can fix it, so the mail waits.
    return uniformResult(LOCAL_UPSTREAM, count, 'deferred', `local delivery failed: ${(err as Error).message}`);
  }
  return uniformResult(LOCAL_UPSTREAM, count, 'delivered', `stored as ${path.basename(file)}`);
}
