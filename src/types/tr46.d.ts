// tr46 ships no types: the two functions relayq calls (src/address.ts).
declare module 'tr46' {
  interface Options {
    checkBidi?: boolean;
    checkHyphens?: boolean;
    checkJoiners?: boolean;
    ignoreInvalidPunycode?: boolean;
    transitionalProcessing?: boolean;
    useSTD3ASCIIRules?: boolean;
    verifyDNSLength?: boolean;
  }
  /** The domain in ASCII (punycode), or null when UTS #46 processing finds an error. */
  export function toASCII(domainName: string, options?: Options): string | null;
  /** The domain in Unicode, and whether processing found an error. */
  export function toUnicode(domainName: string, options?: Options): { domain: string; error: boolean };
}
