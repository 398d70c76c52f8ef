// Loaded with `node --import ./scripts/node/register.mjs tests/web/<file>.mjs`
// (scripts/test.sh does this). It lets page tests anywhere in the repo write
// plain `import { chromium } from 'playwright-core'`: bare specifiers that do
// not resolve from the test file's own directory are resolved again from
// scripts/node/, where scripts/setup.sh installs the locked npm packages.
import { register } from 'node:module';

register('./resolve-hook.mjs', import.meta.url);
