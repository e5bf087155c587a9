import assert from 'node:assert/strict';
import { test } from 'node:test';
import { commandName } from '../../src/cli/early-signals.js';

test('the command is read as commander reads it: the first word that is no option nor a global option\'s value', () => {
  assert.equal(commandName(['serve', '--smtpPort', '2526']), 'serve');
  assert.equal(commandName(['--json', '--config', 'serve', 'status']), 'status');
  assert.equal(commandName(['--config=relay.json', '--databasePath', 'queue', 'serve']), 'serve');
  assert.equal(commandName(['--emailsDir', 'x']), undefined);
  assert.equal(commandName([]), undefined);
});
