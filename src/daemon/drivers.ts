/**
 * The block drivers a daemon can open. One list, so blockdev-add, --blockdev and blockdev-create agree.
 */
import type { BlockDriver } from '../block/graph.js';
import { fileDriver, hostDeviceDriver } from '../block/drivers/file.js';
import { rawDriver } from '../block/drivers/raw.js';
import { nullAioDriver, nullDriver } from '../block/drivers/null.js';
import { blkdebugDriver } from '../block/drivers/blkdebug.js';
import { qcow2Driver } from '../block/drivers/qcow2/index.js';
import { throttleDriver } from '../block/filters/throttle.js';
import { cbwDriver } from '../block/filters/copy-before-write.js';
import { copyOnReadDriver } from '../block/filters/copy-on-read.js';
import { snapshotAccessDriver } from '../block/filters/snapshot-access.js';
import { nbdDriver } from '../nbd/client-driver.js';
import { rbdDriver } from '../block/drivers/rbd.js';

export const BLOCK_DRIVERS: BlockDriver[] = [fileDriver, hostDeviceDriver, rawDriver, nullDriver, nullAioDriver, blkdebugDriver, qcow2Driver, throttleDriver, cbwDriver, copyOnReadDriver, snapshotAccessDriver, nbdDriver, rbdDriver];
