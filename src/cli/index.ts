#!/usr/bin/env node
// The `relayq` command. `serve` runs the relay; the other commands work on the same database
// file while it runs.
import { Command } from 'commander';
import { serve } from './serve.js';

const program = new Command();
program.name('relayq').description('Durable SMTP store-and-forward relay').showHelpAfterError();

program
  .command('serve')
  .description('run the relay (SMTP intake, delivery workers, HTTP API); config keys may be given as --key value')
  .allowUnknownOption(true)
  .helpOption('-h, --help')
  .argument('[options...]')
  .action(async (_args: string[], _opts: unknown, cmd: Command) => {
    await serve(cmd.args, process.env);
  });

program.parseAsync(process.argv).catch((err: Error) => {
  process.stderr.write(`relayq: ${err.message}\n`);
  process.exit(1);
});
