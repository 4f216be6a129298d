/**
 * The one error type for user-facing failures. Its class and message are what a QMP client sees in
 * {"error": {"class", "desc"}}; the wording follows QEMU's wherever QEMU has one, so scripts written
 * against QEMU keep working. Anything thrown that is not a QmpError is a bug or an OS error and is
 * reported as GenericError with its message.
 */
export type QmpErrorClass = 'GenericError' | 'CommandNotFound' | 'DeviceNotActive' | 'DeviceNotFound' | 'KVMMissingCap';

export class QmpError extends Error {
  constructor(
    readonly errorClass: QmpErrorClass,
    message: string,
  ) {
    super(message);
    this.name = 'QmpError';
  }
}

/** GenericError with QEMU's message text: the common case. */
export function genericError(message: string): QmpError {
  return new QmpError('GenericError', message);
}

/** strerror() text as glibc prints it, for the errno codes block I/O produces. QEMU embeds it in messages. */
const STRERROR: Record<string, string> = {
  EIO: 'Input/output error',
  ENOSPC: 'No space left on device',
  ENOENT: 'No such file or directory',
  EACCES: 'Permission denied',
  EPERM: 'Operation not permitted',
  EINVAL: 'Invalid argument',
  ENOTSUP: 'Operation not supported',
  EOPNOTSUPP: 'Operation not supported',
  EROFS: 'Read-only file system',
  EAGAIN: 'Resource temporarily unavailable',
  EBUSY: 'Device or resource busy',
  EEXIST: 'File exists',
  EISDIR: 'Is a directory',
  ENOTDIR: 'Not a directory',
  EFBIG: 'File too large',
  ENOMEM: 'Cannot allocate memory',
  ECANCELED: 'Operation canceled',
  ENOMEDIUM: 'No medium found',
  EFAULT: 'Bad address',
  ERANGE: 'Numerical result out of range',
  ESHUTDOWN: 'Cannot send after transport endpoint shutdown',
  ECONNRESET: 'Connection reset by peer',
  EPIPE: 'Broken pipe',
  ETIMEDOUT: 'Connection timed out',
  ECONNREFUSED: 'Connection refused',
  EBADF: 'Bad file descriptor',
  ENOTCONN: 'Transport endpoint is not connected',
};

export function strerror(code: string): string {
  return STRERROR[code] ?? code;
}

/**
 * An I/O error from a block node, carrying the errno code (EIO, ENOSPC, …) so that job error policies
 * (enospc) and NBD replies can tell them apart. Its message is strerror's text, as QEMU reports it.
 */
export class BlockIOError extends Error {
  constructor(
    readonly code: string,
    message?: string,
  ) {
    super(message ?? strerror(code));
    this.name = 'BlockIOError';
  }
}

/** The errno code of any error (BlockIOError, Node's SystemError), EIO when there is none. */
export function errorCode(err: unknown): string {
  if (err instanceof BlockIOError) return err.code;
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' && code.startsWith('E') ? code : 'EIO';
}

/** The message a user sees for any thrown value. */
export function errorMessage(err: unknown): string {
  if (err instanceof Error) return err.message;
  return String(err);
}
