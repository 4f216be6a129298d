/**
 * What a copy does about a failed read or write: the one mapping from an error policy (QAPI's
 * BlockdevOnError, the on-source-error/on-target-error of block jobs and the on-cbw-error family) and
 * the error to an action, as QEMU's block_job_error_action decides it.
 */
import { errorCode } from '../../errors.js';

/** BlockdevOnError. 'auto' behaves as 'report' for jobs. */
export type OnError = 'report' | 'ignore' | 'enospc' | 'stop' | 'auto';

/**
 * BlockErrorAction: 'report' fails the operation with the error; 'ignore' goes on as if the range had
 * been copied (the caller keeps it dirty, so it is retried); 'stop' pauses until the user resumes.
 */
export type ErrorAction = 'report' | 'ignore' | 'stop';

export function errorActionFor(policy: OnError, err: unknown): ErrorAction {
  switch (policy) {
    case 'enospc':
      return errorCode(err) === 'ENOSPC' ? 'stop' : 'report';
    case 'stop':
      return 'stop';
    case 'ignore':
      return 'ignore';
    default:
      return 'report';
  }
}
