// The certificate and key for STARTTLS (tls.cert, tls.key): read and checked once at start, so
// that a wrong path or a key that does not fit stops the start with the key named, and a
// certificate out of its validity dates is a startup warning rather than failed handshakes.
import { X509Certificate } from 'node:crypto';
import tls from 'node:tls';
import { isoTime } from '../clock.js';
import { readRootsFile } from '../root-guard.js';

/** The certificate and key for STARTTLS; an error names the config key to fix (both, one line each, when neither can be read). */
export function readTlsFiles(certFile: string, keyFile: string): { cert: Buffer; key: Buffer; keyMode: number } {
  const unreadable: string[] = [];
  let keyMode = 0;
  const read = (key: string, file: string) => {
    try {
      const { bytes, stat } = readRootsFile(file, 'would serve the certificate or key put there');
      if (key === 'tls.key') keyMode = stat.mode;
      return bytes;
    } catch (err) {
      unreadable.push(`config error: ${key}: cannot read ${file}: ${(err as Error).message}`);
      return Buffer.alloc(0);
    }
  };
  const files = { cert: read('tls.cert', certFile), key: read('tls.key', keyFile) };
  if (unreadable.length > 0) throw new Error(unreadable.join('\n'));
  if (isEncryptedKey(files.key)) {
    throw new Error(
      `config error: tls.key: ${keyFile} is encrypted with a passphrase, which relayq cannot be given: ` +
        'write it out unencrypted (openssl pkey -in <encrypted> -out <plain>), readable by the relay user alone',
    );
  }
  try {
    tls.createSecureContext(files);
  } catch (err) {
    throw new Error(`config error: tls.cert, tls.key: ${certFile} and ${keyFile} are not a PEM certificate and its key: ${(err as Error).message}`);
  }
  return { ...files, keyMode };
}

/**
 * A warning when every user of the machine may read `tls.key` (mode `keyMode`): any of them could
 * pose as the relay to its clients and take the passwords they send. A group that may read it is
 * taken as meant (root:relayq 0640), as for a config file that holds secrets.
 */
export function exposedKeyWarning(keyFile: string, keyMode: number): string | undefined {
  if ((keyMode & 0o004) === 0) return undefined;
  return `tls.key ${keyFile} may be read by every user of this machine (mode 0${(keyMode & 0o777).toString(8)}), who could pose as this relay to its clients: chmod o-r it`;
}

/** PKCS#8 (`BEGIN ENCRYPTED PRIVATE KEY`) and the older OpenSSL form (`Proc-Type: 4,ENCRYPTED`). */
function isEncryptedKey(pem: Buffer): boolean {
  const text = pem.toString('latin1');
  return text.includes('-----BEGIN ENCRYPTED PRIVATE KEY-----') || /^Proc-Type: *4, *ENCRYPTED\b/m.test(text);
}

/**
 * A warning when `tls.cert` (`pem`, checked by readTlsFiles) is expired or not valid yet: relayq
 * starts with it (clients that do not verify certificates still use it), but every client that
 * verifies fails its STARTTLS. A certificate's times are whole seconds, and it is valid from its
 * notBefore through its notAfter, both included (RFC 5280 4.1.2.5), so `now` is compared to the second.
 */
export function certificateWarning(certFile: string, pem: Buffer, nowMs: number): string | undefined {
  const cert = new X509Certificate(pem);
  const validFrom = Date.parse(cert.validFrom);
  const validTo = Date.parse(cert.validTo);
  const now = Math.floor(nowMs / 1000) * 1000;
  if (now > validTo) return `tls.cert ${certFile} expired on ${isoTime(validTo)}: clients that verify certificates cannot use STARTTLS`;
  if (now < validFrom) return `tls.cert ${certFile} is not valid before ${isoTime(validFrom)}: clients that verify certificates cannot use STARTTLS`;
  return undefined;
}
