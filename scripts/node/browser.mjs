// Shared launcher for page tests (tests/web/*.mjs):
//
//   import { launchChromium } from '../../scripts/node/browser.mjs';
//   const browser = await launchChromium();
//
// Uses Debian's Chromium (never a Playwright-downloaded browser). Override the
// binary with BEAA_CHROMIUM=/path/to/chromium.
import { chromium } from 'playwright-core';

export const CHROMIUM_PATH = process.env.BEAA_CHROMIUM || '/usr/bin/chromium';

export const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--no-first-run',
];

export function launchChromium(options = {}) {
  return chromium.launch({
    executablePath: CHROMIUM_PATH,
    headless: true,
    ...options,
    args: [...CHROMIUM_ARGS, ...(options.args || [])],
  });
}
