/** The QEMU version we answer with (QMP greeting and query-version): the release whose behaviour we follow. */
export const QEMU_COMPAT_VERSION = { qemu: { major: 7, minor: 2, micro: 0 }, package: 'bitmirror-0.1.0' };
