// What an envelope address is for every part of relayq: its longest length, the form of its
// domain that relayq stores, counts and looks up, and the form it takes in the envelope sent upstream.
import net from 'node:net';
import { normalizeIPv6 } from 'smtp-server/lib/ipv6-normalize.js';
import { toASCII, toUnicode } from 'tr46';

/** The longest envelope address relayq accepts (64 octets of local part, @, 255 of domain). */
export const MAX_ADDRESS_LENGTH = 320;

/** Only ASCII characters: what a server without SMTPUTF8 takes in an address. */
export function isAscii(text: string): boolean {
  return /^[\x00-\x7f]*$/.test(text);
}

/** A path as MAIL FROM and RCPT TO write it, `<bob@example.com>` or `<>`, without its brackets. */
export function withoutAngleBrackets(path: string): string {
  return /^<(.*)>$/s.exec(path)?.[1] ?? path;
}

/**
 * IDNA processing (UTS #46) with the options of the URL standard's "domain to ASCII": mapped
 * (lower case, NFC, fullwidth letters made ASCII), not transitional (`ß` stays), hyphens and DNS
 * lengths not checked here. From the tr46 package, whose Unicode tables the lock file pins, not
 * from Node's URL parser, whose tables change with Node's version (Node 20 maps `ẞ` to `ss`,
 * Node 26 to `ß`, as Unicode 15.1 does): the form of a domain that relayq stores, counts and
 * sends must not change with the Node it runs on.
 */
const IDNA = { checkBidi: true, checkHyphens: false, checkJoiners: true, useSTD3ASCIIRules: false, transitionalProcessing: false, verifyDNSLength: false } as const;
/** What a host name cannot hold (the URL standard's forbidden domain code points). */
const FORBIDDEN_IN_DOMAIN = /[\x00-\x20#%/:<>?@[\\\]^|\x7f]/;

/**
 * A domain that IDNA may map or refuse: not ASCII, or with an `xn--` label in any case (smtp-server
 * decodes only lower-case ones). Any other is taken as written.
 */
export function isIdnDomain(domain: string): boolean {
  return !isAscii(domain) || /(^|\.)xn--/i.test(domain);
}

/** The domain in ASCII (punycode) as IDNA maps it, or '' when IDNA refuses it. */
export function domainToAscii(domain: string): string {
  const ascii = toASCII(domain, IDNA);
  return ascii === null || FORBIDDEN_IN_DOMAIN.test(ascii) ? '' : ascii;
}

/** An ASCII domain with its punycode labels decoded, or '' when IDNA refuses it. */
function domainToUnicode(ascii: string): string {
  const { domain, error } = toUnicode(ascii, IDNA);
  return error ? '' : domain;
}

/**
 * An address whose domain is internationalized (non-ASCII, or with an `xn--` label in any case)
 * with that domain as IDNA maps it, in Unicode: lower case, NFC, fullwidth letters made ASCII.
 * `bob@XN--MNCHEN-3YA.DE`, `bob@MÜNCHEN.de` and `bob@ｍüｎｃｈｅｎ.de` go upstream as one address,
 * so they are stored, counted and found as one (smtp-server decodes only lower-case `xn--`
 * labels). An IPv6 literal is written as smtp-server stores it (`[IPv6:2001:DB8:0:0:0:0:0:1]` is
 * `[IPv6:2001:db8::1]`), so that a filter finds it however it is written. Any other ASCII domain,
 * or one IDNA refuses, is returned as written.
 */
export function decodeIdnDomain(address: string): string {
  const at = address.lastIndexOf('@');
  const domain = address.slice(at + 1);
  const ipv6 = domain.startsWith('[') ? /^\[IPv6:(.*)\]$/i.exec(domain)?.[1] : undefined;
  if (at >= 0 && ipv6 !== undefined && net.isIPv6(ipv6)) return `${address.slice(0, at)}@[IPv6:${normalizeIPv6(ipv6)}]`;
  if (at < 0 || !isIdnDomain(domain)) return address;
  const ascii = domainToAscii(domain);
  return `${address.slice(0, at)}@${(ascii && domainToUnicode(ascii)) || domain}`;
}

/**
 * What makes two addresses one: the domain decoded (decodeIdnDomain), then the whole lower-cased.
 * Decoding comes first: IDNA maps some capitals otherwise than their lower case (`ΑΣ-1.GR` is
 * `ασ-1.gr`, where lower case makes the final `Σ` a `ς`, and `ας-1.gr` is a domain of its own).
 * Rate limits count senders by it, maxRecipients counts recipients by it, and a message stores
 * each recipient once by it.
 */
export function addressKey(address: string): string {
  return decodeIdnDomain(address).toLowerCase();
}

/**
 * The form an address takes in the envelope sent upstream (MAIL FROM and RCPT TO): the domain
 * lower-cased, and an internationalized domain in its ASCII (punycode) form, as nodemailer writes
 * it. The upstream's replies name recipients in this form, so outcomes are matched back through
 * it too. An address literal (`[IPv6:…]`, `[127.0.0.1]`) stays as it is: RFC 5321 writes the tag
 * `IPv6:`, and a strict upstream could refuse `ipv6:`.
 */
export function normalizeForEnvelope(address: string): string {
  const at = address.lastIndexOf('@');
  if (at < 0) return address;
  const domain = address.slice(at + 1);
  if (domain.startsWith('[')) return address;
  const ascii = isAscii(domain) ? domain : domainToAscii(domain) || domain;
  return `${address.slice(0, at)}@${ascii.toLowerCase()}`;
}
