// Module hooks of the kici-agent TypeScript runner (registered with module.register).
//
// Node's own type stripping is not enough for real workflows: they import types without
// `import type`, write `./x.js` for a file that is `x.ts`, and use enums. So:
// * resolve: a relative `./x.js` (or `.mjs`) specifier maps to `./x.ts` (`.mts`) when that file
//   exists; an extensionless relative specifier tries `.ts` and `/index.ts`.
// * resolve: `kici-agent-sdk-of:<url>` is `@kici-dev/sdk` as the module at <url> resolves it.
// * load: `.ts`, `.mts` and `.cts` files are transformed as ES modules with a real TypeScript
//   transform: the repository's own `oxc-transform` when it has one, else the bundled sucrase.

import { statSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';

const TS_FILE = /\.(?:ts|mts|cts)$/;

/** (path, source) -> Promise<code>; set by initialize. */
let transformTs;

export async function initialize(data) {
  if (data && data.oxcTransform) {
    const oxc = await import(data.oxcTransform);
    const api = oxc.default && !oxc.transformSync && !oxc.transform ? oxc.default : oxc;
    const run = api.transformSync || api.transform;
    transformTs = async (path, source) => {
      const result = await run(path, source, { sourceType: 'module', lang: 'ts' });
      if (result.errors && result.errors.length > 0) {
        const first = result.errors[0];
        throw new Error(`${path}: ${first.message || String(first)}`);
      }
      return result.code;
    };
  } else {
    const { transform } = await import(data.sucrase);
    transformTs = async (path, source) =>
      transform(source, { transforms: ['typescript'], filePath: path, disableESTransforms: true })
        .code;
  }
}

function isFile(url) {
  try {
    return statSync(fileURLToPath(url)).isFile();
  } catch {
    return false;
  }
}

function typeScriptCandidates(specifier, parentURL) {
  const js = specifier.match(/^(.*)\.(js|mjs|cjs)$/);
  if (js) {
    const ts = { js: 'ts', mjs: 'mts', cjs: 'cts' }[js[2]];
    return [new URL(`${js[1]}.${ts}`, parentURL)];
  }
  if (!/\.[a-z]+$/i.test(specifier)) {
    return [new URL(`${specifier}.ts`, parentURL), new URL(`${specifier}/index.ts`, parentURL)];
  }
  return [];
}

/**
 * `kici-agent-sdk-of:<module URL>` resolves `@kici-dev/sdk` as that module's own imports do
 * (same conditions, same parent), so the runner gets the very instance the workflow imported.
 */
const SDK_OF = 'kici-agent-sdk-of:';

export async function resolve(specifier, context, nextResolve) {
  if (specifier.startsWith(SDK_OF)) {
    return nextResolve('@kici-dev/sdk', { ...context, parentURL: specifier.slice(SDK_OF.length) });
  }
  const relative = specifier.startsWith('./') || specifier.startsWith('../');
  const fromTs = context.parentURL && TS_FILE.test(new URL(context.parentURL).pathname);
  if (relative && fromTs) {
    const found = typeScriptCandidates(specifier, context.parentURL).find(isFile);
    if (found) {
      return { url: found.href, format: 'module', shortCircuit: true };
    }
  }
  return nextResolve(specifier, context);
}

export async function load(url, context, nextLoad) {
  if (url.startsWith('file:') && TS_FILE.test(new URL(url).pathname)) {
    const path = fileURLToPath(url);
    const source = await readFile(path, 'utf8');
    return { format: 'module', source: await transformTs(path, source), shortCircuit: true };
  }
  return nextLoad(url, context);
}
