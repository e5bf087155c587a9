#!/usr/bin/env node
// The `relayq` command's entry: it listens for serve's stop signals (early-signals.ts) before it
// loads the program, its options and their modules, which take some hundreds of milliseconds on a
// busy machine: a signal meanwhile would otherwise end the process at once.
import './early-signals.js';

await import('./program.js');
