import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { Transaction, runAllOrNothing, type TransactionAction } from '../../src/base/transaction.js';

/** An action that logs every step as "<name>.<step>"; its prepare throws when `fails`. */
function logged(log: string[], name: string, fails = false): TransactionAction {
  return {
    async prepare() {
      log.push(`${name}.prepare`);
      await Promise.resolve();
      if (fails) throw new Error(`${name} failed`);
    },
    commit: () => void log.push(`${name}.commit`),
    abort: () => void log.push(`${name}.abort`),
    clean: () => void log.push(`${name}.clean`),
  };
}

test('transaction: all prepare, then commit in order, then clean in order', async () => {
  const log: string[] = [];
  await runAllOrNothing([logged(log, 'a'), logged(log, 'b'), logged(log, 'c')]);
  assert.deepEqual(log, ['a.prepare', 'b.prepare', 'c.prepare', 'a.commit', 'b.commit', 'c.commit', 'a.clean', 'b.clean', 'c.clean']);
});

test('transaction: a failing prepare aborts newest first, its own abort included; later actions are never built', async () => {
  const log: string[] = [];
  let builtAfterFailure = false;
  function* actions(): Generator<TransactionAction> {
    yield logged(log, 'a');
    yield logged(log, 'b', true);
    builtAfterFailure = true;
    yield logged(log, 'c');
  }
  await assert.rejects(runAllOrNothing(actions()), /^Error: b failed$/);
  assert.deepEqual(log, ['a.prepare', 'b.prepare', 'b.abort', 'a.abort', 'a.clean', 'b.clean']);
  assert.equal(builtAfterFailure, false);
});

test('transaction: abort undoes actions added without a prepare (a change already made), and a transaction ends once', async () => {
  const log: string[] = [];
  const tran = new Transaction();
  tran.add({ abort: () => void log.push('undo first change') });
  tran.add(logged(log, 'x'));
  await tran.prepare();
  tran.add({ abort: () => void log.push('undo second change'), commit: () => void log.push('keep second change') });
  await tran.abort();
  assert.deepEqual(log, ['x.prepare', 'undo second change', 'x.abort', 'undo first change', 'x.clean']);
  await assert.rejects(tran.commit(), /transaction already ended/);
  assert.throws(() => tran.add({}), /transaction already ended/);
});

test('transaction: prepare() prepares only what was added since the last call', async () => {
  const log: string[] = [];
  const tran = new Transaction();
  tran.add(logged(log, 'a'));
  await tran.prepare();
  tran.add(logged(log, 'b'));
  await tran.prepare();
  await tran.prepare();
  await tran.commit();
  assert.deepEqual(log, ['a.prepare', 'b.prepare', 'a.commit', 'b.commit', 'a.clean', 'b.clean']);
});

test('transaction: commitNewestFirst commits newest first (QEMU job groups and graph transactions)', async () => {
  const log: string[] = [];
  const tran = new Transaction({ commitNewestFirst: true });
  for (const name of ['a', 'b', 'c']) tran.add(logged(log, name));
  await tran.prepare();
  await tran.commit();
  assert.deepEqual(log, ['a.prepare', 'b.prepare', 'c.prepare', 'c.commit', 'b.commit', 'a.commit', 'a.clean', 'b.clean', 'c.clean']);
});
