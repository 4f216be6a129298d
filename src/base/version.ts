/** The QEMU version we answer with (QMP greeting and query-version): the release whose behaviour we follow. */
export const QEMU_COMPAT_VERSION = { qemu: { micro: 0, minor: 2, major: 7 }, package: 'bitmirror-0.1.0' };
