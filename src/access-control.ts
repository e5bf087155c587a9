// Who may talk to relayq: loopback detection (shared by SMTP and the HTTP API), the
// allowedNetworks CIDR list (checked with node's BlockList), and how a secret is compared; and
// how an address and port are written.
import crypto from 'node:crypto';
import net from 'node:net';

/** "::ffff:127.0.0.1" → "127.0.0.1"; other addresses unchanged. */
export function normalizeIp(address: string | undefined): string {
  if (!address) return '';
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address);
  return mapped ? mapped[1] : address;
}

/** `host:port`, an IPv6 address in brackets (`[::1]:2525`, as Postfix writes it): `::1:2525` is an address itself. */
export function hostPort(host: string, port: number): string {
  return net.isIPv6(host) ? `[${host}]:${port}` : `${host}:${port}`;
}

export function isLoopback(address: string | undefined): boolean {
  const ip = normalizeIp(address);
  return ip === '::1' || /^127\.\d+\.\d+\.\d+$/.test(ip);
}

export interface ClientPolicy {
  allowLocalOnly: boolean;
  allowedNetworks: readonly string[];
}

/** Returns a predicate telling whether a client address may use the SMTP port. */
export function clientFilter(policy: ClientPolicy): (address: string | undefined) => boolean {
  if (policy.allowLocalOnly) return isLoopback;
  if (policy.allowedNetworks.length === 0) return () => true;
  const list = new net.BlockList();
  for (const cidr of policy.allowedNetworks) {
    const parsed = parseCidr(cidr);
    if (parsed) list.addSubnet(parsed.address, parsed.bits, parsed.family === 4 ? 'ipv4' : 'ipv6');
  }
  return (address) => {
    const ip = normalizeIp(address);
    const family = net.isIP(ip);
    if (family === 0) return false;
    return list.check(ip, family === 4 ? 'ipv4' : 'ipv6');
  };
}

/**
 * "10.0.0.0/8" → parts, or undefined when malformed. `network` is the address with its host bits
 * cleared (what the entry admits), `first` the same as a number, `hostBits` whether the address
 * had any set (`10.0.0.1/8`).
 */
export function parseCidr(
  cidr: string,
): { address: string; bits: number; family: 4 | 6; network: string; first: bigint; hostBits: boolean } | undefined {
  const [address, bitsText, extra] = cidr.split('/');
  if (extra !== undefined) return undefined;
  const family = net.isIP(address);
  if (family === 0) return undefined;
  const maxBits = family === 4 ? 32 : 128;
  const bits = bitsText === undefined ? maxBits : Number(bitsText);
  if (!Number.isInteger(bits) || bits < 0 || bits > maxBits || (bitsText !== undefined && !/^\d+$/.test(bitsText))) return undefined;
  const groups = family === 4 ? address.split('.').map(Number) : ipv6Groups(address);
  const groupBits = family === 4 ? 8n : 16n;
  const value = groups.reduce((n, group) => (n << groupBits) | BigInt(group), 0n);
  const hostMask = (1n << BigInt(maxBits - bits)) - 1n;
  const masked = value & ~hostMask;
  const maskedGroups = groups.map((_, i) => Number((masked >> (groupBits * BigInt(groups.length - 1 - i))) & ((1n << groupBits) - 1n)));
  const network =
    family === 4 ? maskedGroups.join('.') : new net.SocketAddress({ address: maskedGroups.map((g) => g.toString(16)).join(':'), family: 'ipv6' }).address;
  return { address, bits, family: family as 4 | 6, network, first: masked, hostBits: (value & hostMask) !== 0n };
}

/** The eight 16-bit groups of an IPv6 address ("::1", "::ffff:1.2.3.4", "fe80::1%eth0"). */
export function ipv6Groups(address: string): number[] {
  let text = address.replace(/%.*$/, '');
  const ipv4 = /(\d+)\.(\d+)\.(\d+)\.(\d+)$/.exec(text);
  if (ipv4) {
    const [a, b, c, d] = ipv4.slice(1).map(Number);
    text = `${text.slice(0, ipv4.index)}${((a << 8) | b).toString(16)}:${((c << 8) | d).toString(16)}`;
  }
  const [head, tail] = text.split('::');
  const parse = (part: string | undefined) => (part ? part.split(':').map((g) => Number.parseInt(g, 16)) : []);
  if (tail === undefined) return parse(head);
  const [before, after] = [parse(head), parse(tail)];
  return [...before, ...Array<number>(8 - before.length - after.length).fill(0), ...after];
}

/** A secret compared in constant time (hashed first, so that the lengths may differ). */
export function secretsEqual(given: string, expected: string): boolean {
  const a = crypto.createHash('sha256').update(given).digest();
  const b = crypto.createHash('sha256').update(expected).digest();
  return crypto.timingSafeEqual(a, b);
}
