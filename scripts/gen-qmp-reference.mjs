#!/usr/bin/env node
// Writes docs/qmp-reference.md from the command schemas (run `npm run docs:qmp`, which builds first).
import { writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import * as path from 'node:path';
import { qmpReference } from '../dist/src/daemon/qmp-reference.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
writeFileSync(path.join(root, 'docs/qmp-reference.md'), qmpReference());
