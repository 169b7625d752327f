// kici-agent TypeScript runner: runs the steps of one KiCI job written against @kici-dev/sdk.
//
// Started by the agent once per job, in the job's process group, with the sanitised step
// environment and the job workspace as its working directory. It talks to the agent in JSON
// lines over fd 3 (never stdout, which belongs to user code):
//   agent -> runner  {type:'job', ...}            the job request (first message)
//                    {type:'list', workspace, runnerDir, sourceFile}   list the jobs instead
//                    {type:'abort', force}        cancel (graceful: cancel hooks run)
//   runner -> agent  {type:'step.start', index, name, kind, group?}   kind: step, hook:<type>,
//                                                  or init (index 1_000_000 + n)
//                    {type:'step.pending', index, name, group}
//                    {type:'log', index, text}    output of a step (index -1: the job)
//                    {type:'secret.output', index, key, value}   ctx.setSecretOutput (the agent
//                     masks the value and seals it for the run; sent only when the job request
//                     says the run has a key: secretOutputError absent)
//                    {type:'step.complete', index, name, kind, group?, status, durationMs,
//                     error?: {message, exitCode?}, outputs?}
//                    {type:'job.complete', status, error?, outputs}
//                    {type:'jobs', workflows: [{name, jobs: [name]}]}   (reply to list)
// The agent masks secrets, caps and paces the logs, and owns statuses, timeouts of the whole
// job and killing the process group; this program does only what needs JavaScript.

import net from 'node:net';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import crypto from 'node:crypto';
import { AsyncLocalStorage } from 'node:async_hooks';
import { spawn } from 'node:child_process';
import { createRequire, register } from 'node:module';
import { pathToFileURL } from 'node:url';
import { format } from 'node:util';
import { StringDecoder } from 'node:string_decoder';

const JOB_INDEX = -1;
const DEFAULT_HOOK_TIMEOUT_MS = 5 * 60 * 1000;
const DEFAULT_INIT_TIMEOUT_MS = 10 * 60 * 1000;
/** Init pseudo-steps are reported at 1_000_000 + n, clear of any step or hook index. */
const INIT_INDEX_BASE = 1_000_000;
/** Files whose presence makes `init: 'auto'` pick the mise preset. */
const MISE_MARKERS = ['mise.toml', '.mise.toml', '.tool-versions'];
const RETRY_DEFAULTS = { delayMs: 1000, backoff: 'exponential', maxDelayMs: 30000 };
const RESERVED_ENV = new Set(['KICI_ENV', 'KICI_PATH', 'PATH_SEPARATOR']);

// --- the channel to the agent ----------------------------------------------------------------

const channel = new net.Socket({ fd: 3, readable: true, writable: true });
channel.on('error', () => process.exit(70));

function send(message) {
  return channel.write(JSON.stringify(message) + '\n');
}

function finish(code) {
  channel.end(() => process.exit(code));
}

const inbox = [];
const inboxWaiters = [];
let abortHandler = () => {};
{
  let buffered = '';
  channel.setEncoding('utf8');
  channel.on('data', (chunk) => {
    buffered += chunk;
    let newline;
    while ((newline = buffered.indexOf('\n')) >= 0) {
      const line = buffered.slice(0, newline);
      buffered = buffered.slice(newline + 1);
      if (!line.trim()) continue;
      const message = JSON.parse(line);
      if (message.type === 'abort') abortHandler(message.force === true);
      else if (inboxWaiters.length) inboxWaiters.shift()(message);
      else inbox.push(message);
    }
  });
  // The agent went away: nobody is left to report to.
  channel.on('end', () => abortHandler(true));
}

function nextMessage() {
  return inbox.length ? Promise.resolve(inbox.shift()) : new Promise((r) => inboxWaiters.push(r));
}

// --- output attribution ---------------------------------------------------------------------

/** The step (pseudo-step) index whose code is running: console.* and $ output go there. */
const currentStep = new AsyncLocalStorage();

function log(index, text) {
  return send({ type: 'log', index, text });
}

function stepIndex() {
  const step = currentStep.getStore();
  return step === undefined ? JOB_INDEX : step;
}

for (const method of ['log', 'info', 'debug', 'warn', 'error', 'trace']) {
  console[method] = (...args) => {
    log(stepIndex(), format(...args) + '\n');
  };
}
for (const stream of [process.stdout, process.stderr]) {
  const original = stream.write.bind(stream);
  stream.write = (chunk, encoding, callback) => {
    const step = currentStep.getStore();
    if (step === undefined) return original(chunk, encoding, callback);
    const text = typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('utf8');
    log(step, text);
    const done = typeof encoding === 'function' ? encoding : callback;
    if (done) process.nextTick(done);
    return true;
  };
}

function jobLog(line) {
  log(JOB_INDEX, line + '\n');
}

// --- errors ---------------------------------------------------------------------------------

class Unsupported extends Error {
  constructor(feature) {
    super(`not supported by this agent yet: ${feature}`);
  }
}

/** The SDK's error for an unknown secret key (same name and message shape). */
class SecretNotFoundError extends Error {
  constructor(key, availableKeys) {
    super(
      `Secret "${key}" not found. Available keys: ${availableKeys.join(', ') || '(none)'}. ` +
        `Use ctx.secrets.has('${key}') to check existence.`,
    );
    this.name = 'SecretNotFoundError';
    this.key = key;
    this.availableKeys = availableKeys;
  }
}

function failureOf(error) {
  if (error && typeof error.exitCode === 'number') {
    return { message: `Command failed with exit code ${error.exitCode}`, exitCode: error.exitCode };
  }
  if (error && error.exitCode === null && error.signal) {
    return { message: `Command was killed by signal ${error.signal}` };
  }
  const message = error instanceof Error ? error.message : String(error);
  return { message: message || 'step failed' };
}

// --- loading the workflow -------------------------------------------------------------------

function contentHash(repoRoot, sourceFile, hashFiles) {
  const source = fs.readFileSync(path.join(repoRoot, sourceFile), 'utf8').replace(/\r\n?/g, '\n');
  const hash = crypto.createHash('sha256').update('5:' + source);
  if (Array.isArray(hashFiles)) {
    hash.update('\0');
    for (const rel of hashFiles) {
      let content = '';
      try {
        content = fs.readFileSync(path.join(repoRoot, rel), 'utf8');
      } catch {
        // A listed file that is missing contributes its name only.
      }
      hash.update(rel + '\n' + content);
    }
  }
  return hash.digest('hex');
}

function registerTypeScript(kiciDir, runnerDir) {
  let oxcTransform = null;
  try {
    oxcTransform = pathToFileURL(
      createRequire(path.join(kiciDir, 'package.json')).resolve('oxc-transform'),
    ).href;
  } catch {
    // No oxc-transform in the repository: the bundled sucrase transforms.
  }
  const sucrase = pathToFileURL(path.join(runnerDir, 'vendor', 'sucrase.mjs')).href;
  register(pathToFileURL(path.join(runnerDir, 'loader.mjs')).href, {
    data: { oxcTransform, sucrase },
  });
  return oxcTransform ? 'oxc-transform' : 'sucrase';
}

/** The module's workflows: its default export (one or an array) and tagged named exports. */
function workflowsOf(module) {
  const found = [];
  const add = (value) => {
    if (Array.isArray(value)) value.forEach(add);
    else if (value && value._tag === 'Workflow') found.push(value);
  };
  add(module.default);
  for (const [key, value] of Object.entries(module)) {
    if (key !== 'default' && value && value._tag === 'Workflow') found.push(value);
  }
  return found;
}

function findWorkflow(module, name) {
  return workflowsOf(module).find((w) => w.name === name);
}

function jobsOf(workflow) {
  return (workflow.jobs || []).filter((j) => typeof j !== 'function' && j);
}

async function listJobs(request) {
  registerTypeScript(path.join(request.workspace, '.kici'), request.runnerDir);
  const module = await import(pathToFileURL(path.join(request.workspace, request.sourceFile)).href);
  const workflows = workflowsOf(module).map((w) => ({ name: w.name, jobs: jobsOf(w).map((j) => j.name) }));
  send({ type: 'jobs', workflows });
}

// --- the job's steps --------------------------------------------------------------------------

/** Flattens the job's steps: parallel children take consecutive indices, groups none. */
function planSteps(job, lockNames, stepRefs) {
  const entries = typeof job.run === 'function' ? [{ _tag: 'Step', name: job.name, run: job.run }] : job.steps || [];
  let index = 0;
  let unnamed = 0;
  const flat = [];
  const single = (entry) => {
    const step =
      typeof entry === 'function'
        ? { name: '', run: entry }
        : entry && typeof entry.run === 'function'
          ? entry
          : null;
    if (!step) throw new Error(`step ${index} of job '${job.name}' is not a step`);
    const own = step.name || `step-${++unnamed}`;
    const planned = { index, step, name: lockNames[index] || own };
    if (typeof entry === 'function') stepRefs.set(entry, planned.name);
    index += 1;
    flat.push(planned);
    return planned;
  };
  const plan = (entries || []).map((entry) => {
    if (entry && entry._tag === 'ParallelGroup') {
      return {
        group: entry.name || `parallel-${index}`,
        failFast: entry.failFast !== false,
        maxParallel: entry.maxParallel > 0 ? entry.maxParallel : 0,
        children: (entry.steps || []).map(single),
      };
    }
    return single(entry);
  });
  return { plan, flat };
}

function lockStepNames(jobConfig) {
  const names = [];
  for (const entry of jobConfig.steps || []) {
    if (entry && entry.kind === 'parallel') for (const child of entry.children || []) names.push(child.name);
    else names.push(entry && entry.name);
  }
  return names;
}

function retryPolicy(retry) {
  if (!retry) return { maxAttempts: 1 };
  if (typeof retry === 'number') return { ...RETRY_DEFAULTS, maxAttempts: Math.max(1, retry) };
  return { ...RETRY_DEFAULTS, ...retry, maxAttempts: Math.max(1, retry.maxAttempts || 1) };
}

function retryDelay(policy, attempt) {
  if (policy.backoff === 'fixed') return policy.delayMs;
  return Math.min(policy.delayMs * 2 ** (attempt - 1), policy.maxDelayMs);
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener('abort', () => {
      clearTimeout(timer);
      resolve();
    }, { once: true });
  });
}

/** Reads a step's $KICI_ENV / $KICI_PATH delta (format v1). */
function readDelta(files) {
  const vars = [];
  const paths = [];
  const read = (file) => {
    try {
      return fs.readFileSync(file, 'utf8');
    } catch {
      return '';
    }
  };
  for (const raw of read(files.env).split('\n')) {
    const line = raw.trim();
    const eq = line.indexOf('=');
    if (eq <= 0) continue;
    const key = line.slice(0, eq).trim();
    if (key) vars.push([key, line.slice(eq + 1)]);
  }
  for (const raw of read(files.path).split('\n')) {
    if (raw.trim()) paths.push(raw.trim());
  }
  return { vars, paths };
}

// --- running a job ------------------------------------------------------------------------------

class JobRun {
  constructor(request, job, workflow, zx) {
    this.request = request;
    this.job = job;
    this.workflow = workflow;
    this.zx = zx;
    this.jobConfig = request.jobConfig || {};
    this.secrets = request.secrets || {};
    this.env = { ...process.env };
    // zx gives its bash a socket as stdin; bash with a socket stdin and no SHLVL believes rshd
    // started it and sources ~/.bashrc, which can hang or change the step (pyenv, nvm, ...).
    if (this.env.SHLVL === undefined) this.env.SHLVL = '1';
    this.outputs = {};
    // The same outputs as Maps, for an SDK that reads `.result` references from its own maps.
    this.stepOutputs = new Map();
    // The dispatch's `upstreamJobOutputs` (job name -> step name -> outputs), not a jobConfig field.
    this.upstream = request.upstreamJobOutputs || {};
    this.jobOutputs = new Map(Object.entries(this.upstream));
    this.stepRefs = new WeakMap();
    this.abort = new AbortController();
    this.forced = false;
    this.nextHookIndex = 0;
    this.lastExecuted = null;
    this.failed = null;
    this.tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'kici-env-'));
  }

  get aborted() {
    return this.abort.signal.aborted;
  }

  addPath(dir) {
    const sep = process.platform === 'win32' ? ';' : ':';
    this.env.PATH = this.env.PATH ? `${dir}${sep}${this.env.PATH}` : dir;
  }

  applyDelta(files, name) {
    try {
      const { vars, paths } = readDelta(files);
      for (const [key, value] of vars) {
        if (RESERVED_ENV.has(key) || Object.hasOwn(this.secrets, key)) {
          jobLog(`[kici] Cannot override operator secret "${key}" via $KICI_ENV — value preserved`);
        } else {
          this.env[key] = value;
        }
      }
      for (const dir of paths.reverse()) this.addPath(dir);
    } catch (error) {
      jobLog(`[kici] Failed to apply $KICI_ENV/$KICI_PATH delta of step '${name}': ${error.message}`);
    }
  }

  /** A fresh, empty $KICI_ENV / $KICI_PATH pair for one step or init command. */
  deltaFiles() {
    const dir = fs.mkdtempSync(path.join(this.tmp, 'step-'));
    const files = { env: path.join(dir, 'env'), path: path.join(dir, 'path') };
    fs.writeFileSync(files.env, '');
    fs.writeFileSync(files.path, '');
    return files;
  }

  /**
   * The init phase: each command as pseudo-step `init:<n>`, in the workspace, with the job's
   * env, its own `env` and a $KICI_ENV/$KICI_PATH pair applied before the next. Returns the
   * job's error when one fails (`init[<n>] failed: ...` / `init[<n>] timed out: ...`).
   */
  async runInit(specs) {
    for (const [i, spec] of specs.entries()) {
      if (this.aborted) return null;
      const index = INIT_INDEX_BASE + i;
      const name = `init:${i}`;
      const timeout = spec.timeout || DEFAULT_INIT_TIMEOUT_MS;
      const files = this.deltaFiles();
      send({ type: 'step.start', index, name, kind: 'init' });
      const started = Date.now();
      const result = await this.command(index, spec, files, timeout);
      send({
        type: 'step.complete',
        index,
        name,
        kind: 'init',
        status: result.status,
        durationMs: Date.now() - started,
        error: result.error,
      });
      if (result.status === 'success') {
        this.applyDelta(files, name);
      } else if (result.status === 'failed') {
        return `init[${i}] ${result.timedOut ? 'timed out' : 'failed'}: ${result.error.message}`;
      }
    }
    return null;
  }

  /** One init command in its own process group, killed whole on timeout or cancel. */
  command(index, spec, files, timeoutMs) {
    const shell = spec.shell || 'bash';
    return new Promise((resolve) => {
      const child = spawn(shell, ['-c', spec.run], {
        cwd: this.request.workspace,
        env: { ...this.env, ...(spec.env || {}), KICI_ENV: files.env, KICI_PATH: files.path },
        stdio: ['ignore', 'pipe', 'pipe'],
        detached: true,
      });
      for (const stream of [child.stdout, child.stderr]) {
        const decoder = new StringDecoder('utf8');
        stream.on('data', (chunk) => {
          const text = decoder.write(chunk);
          if (text) log(index, text);
        });
      }
      let timedOut = false;
      const kill = () => {
        try {
          process.kill(-child.pid, 'SIGKILL');
        } catch {
          // Already gone.
        }
      };
      const timer = setTimeout(() => {
        timedOut = true;
        kill();
      }, timeoutMs);
      this.abort.signal.addEventListener('abort', kill, { once: true });
      const done = (result) => {
        clearTimeout(timer);
        this.abort.signal.removeEventListener('abort', kill);
        resolve(result);
      };
      child.on('error', (error) => {
        done({ status: 'failed', error: { message: `could not start ${shell}: ${error.message}` } });
      });
      child.on('close', (code, signal) => {
        if (timedOut) {
          done({ status: 'failed', timedOut, error: { message: `Init 'init:${index - INIT_INDEX_BASE}' timed out after ${timeoutMs}ms` } });
        } else if (this.aborted) {
          done({ status: 'cancelled', error: { message: 'cancelled' } });
        } else if (code === 0) {
          done({ status: 'success' });
        } else if (code !== null) {
          done({ status: 'failed', error: { message: `Command failed with exit code ${code}`, exitCode: code } });
        } else {
          done({ status: 'failed', error: { message: `Command was killed by signal ${signal}` } });
        }
      });
    });
  }

  /** The `$` of one step: zx bound to the step's env, cwd and abort signal, output to its log. */
  shell(index, env, signal) {
    if (!this.zx) {
      return () => {
        throw new Unsupported('ctx.$ without zx in .kici/node_modules');
      };
    }
    const decoders = new Map();
    const logEntry = (entry) => {
      if (entry.kind !== 'stdout' && entry.kind !== 'stderr') return;
      const key = `${entry.id}:${entry.kind}`;
      if (!decoders.has(key)) decoders.set(key, new StringDecoder('utf8'));
      const text = decoders.get(key).write(entry.data);
      if (text) log(index, text);
    };
    return this.zx.$({ cwd: this.request.workspace, env, signal, quiet: true, verbose: false, log: logEntry });
  }

  context(planned, stepEnv, signal) {
    const run = this;
    const index = planned.index;
    const logAt = (level) => (...args) =>
      log(index, (level === 'info' ? '' : `[${level}] `) + format(...args) + '\n');
    const outputsOf = (ref) => run.outputs[run.stepNameOf(ref)];
    const needs = this.upstream;
    const unsupported = (feature) => ({
      get() {
        throw new Unsupported(feature);
      },
    });
    const ctx = {
      $: this.shell(index, stepEnv, signal),
      log: { info: logAt('info'), warn: logAt('warn'), error: logAt('error'), debug: logAt('debug') },
      env: stepEnv,
      setEnv(key, value) {
        run.env[key] = String(value);
        stepEnv[key] = String(value);
      },
      addPath(dir) {
        run.addPath(dir);
        stepEnv.PATH = run.env.PATH;
      },
      signal,
      secrets: this.stepSecrets(stepEnv),
      matrix: this.jobConfig.matrix || {},
      workflow: { name: this.workflow.name },
      job: { name: this.job.name },
      step: { name: planned.name, index },
      dispatchInputs: this.jobConfig.dispatchInputs || {},
      isTestRun: this.jobConfig.isTestRun === true,
      needs,
      outputsOf,
      jobOutputs: (ref) => needs[typeof ref === 'string' ? ref : ref && ref.name],
      setSecretOutput(key, value) {
        if (typeof key !== 'string' || !key.trim()) {
          throw new TypeError('ctx.setSecretOutput: the name must be a non-empty string');
        }
        if (typeof value !== 'string') {
          throw new TypeError(`ctx.setSecretOutput('${key}'): the value must be a string`);
        }
        // The agent says why the run cannot take secret outputs; the value is never in it.
        if (run.request.secretOutputError) throw new Error(run.request.secretOutputError.replace('{key}', () => key));
        send({ type: 'secret.output', index, key, value });
      },
    };
    for (const feature of ['cache', 'emit', 'api', 'provenance', 'approval', 'artifacts']) {
      Object.defineProperty(ctx, feature, unsupported(`ctx.${feature}`));
    }
    return ctx;
  }

  /**
   * `ctx.secrets` as the SDK's StepSecrets: the flat secrets with every context's keys over
   * them (the agent merges them); `get`/`expose` reject for an unknown key, naming the keys
   * there are (names only); `expose` puts the value in this step's env alone.
   */
  stepSecrets(stepEnv) {
    const secrets = this.secrets;
    const known = (key) => {
      if (!Object.hasOwn(secrets, key)) throw new SecretNotFoundError(key, Object.keys(secrets).sort());
      return secrets[key];
    };
    const unsupported = (feature) => async () => {
      throw new Unsupported(feature);
    };
    return {
      get: async (key) => known(key),
      expose: async (key) => {
        stepEnv[key] = known(key);
      },
      has: (key) => Object.hasOwn(secrets, key),
      list: () => Object.keys(secrets).sort(),
      // The dispatch carries no backend or scope of a secret.
      getMeta: () => undefined,
      mountFile: unsupported('ctx.secrets.mountFile'),
      exposeFile: unsupported('ctx.secrets.exposeFile'),
    };
  }

  /** Runs `fn` as its own log bucket with a timeout; resolves to {status, error?, value?}. */
  async invoke(index, fn, ctxOf, timeoutMs, timeoutMessage, parentSignal) {
    const controller = new AbortController();
    const onParentAbort = () => controller.abort(parentSignal.reason);
    if (parentSignal.aborted) onParentAbort();
    else parentSignal.addEventListener('abort', onParentAbort, { once: true });
    // A step that ignores its signal is abandoned (its commands die with the signal).
    const cancelled = new Promise((resolve) => {
      controller.signal.addEventListener('abort', () => {
        if (controller.signal.reason !== 'timeout') {
          resolve({ status: 'cancelled', error: { message: 'cancelled' } });
        }
      }, { once: true });
    });
    let timer;
    const timedOut = new Promise((resolve) => {
      timer = setTimeout(() => {
        controller.abort('timeout');
        resolve({ status: 'failed', error: { message: timeoutMessage } });
      }, timeoutMs);
    });
    const running = currentStep.run(index, async () => {
      try {
        return { status: 'success', value: await fn(ctxOf(controller.signal)) };
      } catch (error) {
        if (controller.signal.aborted && controller.signal.reason !== 'timeout') {
          return { status: 'cancelled', error: failureOf(error) };
        }
        return { status: 'failed', error: failureOf(error) };
      }
    });
    try {
      return await Promise.race([running, timedOut, cancelled]);
    } finally {
      clearTimeout(timer);
      parentSignal.removeEventListener('abort', onParentAbort);
    }
  }

  async checkRules(rules, ctx) {
    for (const rule of rules || []) {
      let passed = false;
      try {
        passed = (await rule.check(ctx)) !== false;
      } catch {
        passed = false;
      }
      if (!passed) return rule;
    }
    return null;
  }

  ruleContext() {
    return {
      env: this.env,
      matrix: this.jobConfig.matrix || {},
      event: this.jobConfig.event,
      workflow: { name: this.workflow.name },
      job: { name: this.job.name },
      outputsOf: (ref) => this.outputs[this.stepNameOf(ref)],
    };
  }

  /** A step reference: its name, a Step, or the bare function of an unnamed step. */
  stepNameOf(ref) {
    if (typeof ref === 'function') return this.stepRefs.get(ref);
    return typeof ref === 'string' ? ref : ref && ref.name;
  }

  /**
   * An SDK with output-map setters reads `step.result` / `job.result` from module-global maps
   * the runner must hand it; they must be the maps of the instance the workflow imported, or
   * every `.result` read fails with "has not produced outputs yet".
   */
  wireOutputMaps(sdk) {
    if (!sdk || typeof sdk.setStepOutputsMap !== 'function') return false;
    sdk.setStepOutputsMap(this.stepOutputs);
    if (typeof sdk.setJobOutputsMap === 'function') sdk.setJobOutputsMap(this.jobOutputs);
    if (typeof sdk.setStepRefMap === 'function') sdk.setStepRefMap(this.stepRefs);
    return true;
  }

  async hook(kind, fn, outcome) {
    if (!fn) return null;
    const run = typeof fn === 'function' ? fn : fn.run;
    const timeout = (typeof fn === 'object' && fn.timeout) || DEFAULT_HOOK_TIMEOUT_MS;
    const index = this.nextHookIndex++;
    const name = kind;
    send({ type: 'step.start', index, name, kind: `hook:${kind}` });
    const started = Date.now();
    const env = { ...this.env };
    const result = await this.invoke(
      index,
      (ctx) => run(ctx),
      (signal) => ({ ...this.context({ index, name }, env, signal), ...outcome }),
      timeout,
      `Hook '${name}' timed out after ${timeout}ms`,
      new AbortController().signal,
    );
    send({
      type: 'step.complete',
      index,
      name,
      kind: `hook:${kind}`,
      status: result.status === 'success' ? 'success' : 'failed',
      durationMs: Date.now() - started,
      error: result.error,
    });
    return result.status === 'success' ? null : result.error.message;
  }

  skip(planned, group, rule) {
    if (rule) jobLog(`[kici] Step '${planned.name}' skipped: rule '${rule.label}' did not pass`);
    send({ type: 'step.complete', index: planned.index, name: planned.name, kind: 'step', group, status: 'skipped', durationMs: 0 });
  }

  /** One step with its rules, hooks, attempts and env hand-off. Returns its final status. */
  async runStep(planned, group, groupSignal) {
    const { step, index, name } = planned;
    const signal = groupSignal || this.abort.signal;
    if (signal.aborted) {
      send({ type: 'step.start', index, name, kind: 'step', group });
      send({ type: 'step.complete', index, name, kind: 'step', group, status: 'cancelled', durationMs: 0 });
      return 'cancelled';
    }
    const rule = await this.checkRules(step.rules, this.ruleContext());
    if (rule) {
      this.skip(planned, group, rule);
      return 'skipped';
    }
    this.lastExecuted = planned;
    const hookOutcome = { step: { name, index }, outputs: this.outputs };
    const before = await this.hook('beforeStep', this.job.beforeStep, hookOutcome);
    if (before) jobLog(`[kici] beforeStep hook failed: ${before} (continuing -- hooks are observers)`);

    const files = this.deltaFiles();
    const policy = retryPolicy(step.retry);
    const timeout = step.timeout || this.request.defaultStepTimeoutMs || 30 * 60 * 1000;
    let result;
    for (let attempt = 1; ; attempt++) {
      send({ type: 'step.start', index, name, kind: 'step', group });
      const started = Date.now();
      const stepEnv = { ...this.env, KICI_ENV: files.env, KICI_PATH: files.path };
      result = await this.invoke(
        index,
        (ctx) => step.run(ctx),
        (stepSignal) => this.context(planned, stepEnv, stepSignal),
        timeout,
        `Step '${name}' timed out after ${timeout}ms`,
        signal,
      );
      const outputs = result.status === 'success' ? outputsOfValue(result.value) : undefined;
      if (outputs) {
        this.outputs[name] = outputs;
        this.stepOutputs.set(name, outputs);
      }
      const retrying = result.status === 'failed' && attempt < policy.maxAttempts && !signal.aborted;
      send({
        type: 'step.complete',
        index,
        name,
        kind: 'step',
        group,
        status: result.status,
        durationMs: Date.now() - started,
        error: result.error,
        outputs,
        retrying,
      });
      if (!retrying) break;
      const delay = retryDelay(policy, attempt);
      jobLog(`[kici] Step '${name}' attempt ${attempt}/${policy.maxAttempts} failed: ${result.error.message}; retrying in ${delay}ms`);
      await sleep(delay, signal);
    }
    this.applyDelta(files, name);
    const after = await this.hook('afterStep', this.job.afterStep, { ...hookOutcome, status: result.status });
    if (after) jobLog(`[kici] afterStep hook failed: ${after} (continuing -- hooks are observers)`);
    if (result.status === 'failed' && step.continueOnError) return 'failed-continue';
    return result.status;
  }

  async runGroup(entry) {
    const controller = new AbortController();
    const onAbort = () => controller.abort(this.abort.signal.reason);
    this.abort.signal.addEventListener('abort', onAbort, { once: true });
    const window = entry.maxParallel || entry.children.length;
    for (const child of entry.children.slice(window)) {
      send({ type: 'step.pending', index: child.index, name: child.name, group: entry.group });
    }
    let next = 0;
    let failed = false;
    const worker = async () => {
      while (next < entry.children.length) {
        const child = entry.children[next++];
        const status = await this.runStep(child, entry.group, controller.signal);
        if (status === 'failed') {
          failed = true;
          if (entry.failFast) controller.abort('failFast');
        }
      }
    };
    await Promise.all(Array.from({ length: Math.min(window, entry.children.length) }, worker));
    this.abort.signal.removeEventListener('abort', onAbort);
    return failed;
  }

  async runSteps(plan) {
    let failedAny = false;
    for (const entry of plan) {
      if (this.aborted) break;
      if (entry.children) {
        if (await this.runGroup(entry)) {
          this.failed = this.failed || `Step group '${entry.group}' failed`;
          return true;
        }
      } else {
        const status = await this.runStep(entry);
        if (status === 'failed') {
          this.failed = `Step "${entry.name}" failed`;
          return true;
        }
        if (status === 'failed-continue') {
          failedAny = true;
          this.failed = this.failed || `Step "${entry.name}" failed`;
        }
      }
    }
    return failedAny;
  }

  async cancelHooks() {
    if (this.forced) {
      jobLog('[kici] Force cancel received, skipping all hooks');
      return [];
    }
    jobLog('[kici] Cancel received, running cancel hooks...');
    const reasons = [];
    const outcome = { status: 'cancelled', outputs: this.outputs };
    const last = this.lastExecuted && this.lastExecuted.step;
    const stepCancel = last && (await this.hook('onCancel', last.onCancel, outcome));
    if (stepCancel) reasons.push(`cancelled (onCancel hook failed: ${stepCancel})`);
    const stepCleanup = last && (await this.hook('cleanup', last.cleanup, outcome));
    if (stepCleanup) reasons.push(`step cleanup hook failed: ${stepCleanup}`);
    const jobCancel = await this.hook('onCancel', this.job.onCancel, outcome);
    if (jobCancel) reasons.push(`cancelled (onCancel hook failed: ${jobCancel})`);
    const jobCleanup = await this.hook('cleanup', this.job.cleanup, outcome);
    if (jobCleanup) reasons.push(`cleanup hook failed: ${jobCleanup}`);
    jobLog(`[kici] Cancel complete, job status: cancelled`);
    return reasons;
  }

  async run(plan, flat, initSpecs) {
    this.nextHookIndex = flat.length;
    const jobRule = await this.checkRules(this.job.rules, this.ruleContext());
    if (jobRule) {
      jobLog(`[kici] Job '${this.job.name}' skipped: rule '${jobRule.label}' did not pass`);
      for (const planned of flat) this.skip(planned, undefined, null);
      return { status: 'success' };
    }
    const started = Date.now();
    const initFailure = await this.runInit(initSpecs);
    if (initFailure) return { status: 'failed', error: initFailure };
    const failed = await this.runSteps(plan);
    if (this.aborted) {
      const reasons = await this.cancelHooks();
      return { status: 'cancelled', error: reasons.length ? reasons.join('; ') : undefined };
    }
    const reasons = [];
    let status = failed ? 'failed' : 'success';
    const outcome = () => ({ status, reason: this.failed, outputs: this.outputs, durationMs: Date.now() - started });
    if (status === 'success') {
      const error = await this.hook('onSuccess', this.job.onSuccess, outcome());
      if (error) {
        status = 'failed';
        reasons.push(`Hook onSuccess failed: ${error}`);
      }
    } else {
      const error = await this.hook('onFailure', this.job.onFailure, outcome());
      if (error) reasons.push(`Hook onFailure failed: ${error}`);
    }
    const cleanup = await this.hook('cleanup', this.job.cleanup, outcome());
    if (cleanup) {
      status = 'failed';
      reasons.push(`Hook cleanup failed: ${cleanup}`);
    }
    const error = [this.failed, ...reasons].filter(Boolean).join('; ') || undefined;
    return { status, error };
  }
}

/** A step's outputs: its return value (an object's entries; anything else under `value`). */
function outputsOfValue(value) {
  if (value === undefined || value === null) return undefined;
  if (typeof value === 'object' && !Array.isArray(value)) return JSON.parse(JSON.stringify(value));
  return { value };
}

/**
 * The job's `init` commands (spec 11.10): a generic spec `{run, shell?, timeout?, env?}`, or an
 * array of them, in order. `false`, unset and `'auto'` without a toolchain marker are none. The
 * `mise` preset (also what `'auto'` picks) and init caches need the kici cache relay: they fail
 * the job as not supported rather than run half of what was asked.
 */
function initSpecsOf(job, repoRoot) {
  const init = job.init;
  if (init === undefined || init === null || init === false) return [];
  if (init === 'auto') {
    const marker = MISE_MARKERS.find((file) => fs.existsSync(path.join(repoRoot, file)));
    if (marker) throw new Unsupported(`init 'auto' (it found ${marker}: the mise preset)`);
    jobLog(`[kici] init 'auto': no toolchain marker (${MISE_MARKERS.join(', ')}), nothing to do`);
    return [];
  }
  return (Array.isArray(init) ? init : [init]).map((item, i) => {
    if (item === 'mise' || (item && typeof item === 'object' && 'mise' in item)) {
      throw new Unsupported('init preset mise');
    }
    if (!item || typeof item.run !== 'string' || !item.run.trim()) {
      throw new Error(`job '${job.name}': init[${i}].run must be a non-empty command`);
    }
    if (item.cache) throw new Unsupported(`init[${i}].cache`);
    return item;
  });
}

function unsupportedJobFeature(workflow, job) {
  if (workflow.concurrency) return 'workflow concurrency groups';
  if (job.cache) return 'job cache';
  if (typeof job.steps === 'function') return 'dynamic jobs';
  return null;
}

// --- main -----------------------------------------------------------------------------------

async function main() {
  const request = await nextMessage();
  if (request && request.type === 'list') {
    await listJobs(request);
    return { status: 'success', listed: true };
  }
  if (!request || request.type !== 'job') throw new Error('the agent sent no job request');
  const jobConfig = request.jobConfig || {};
  const sourceFile = (jobConfig.source && jobConfig.source.file) || '';
  const repoRoot = request.workspace;
  const kiciDir = path.join(repoRoot, '.kici');

  if (jobConfig.contentHash) {
    const actual = contentHash(repoRoot, sourceFile, jobConfig.resolvedHashFiles);
    if (actual !== jobConfig.contentHash) {
      return {
        status: 'failed',
        error: `Lock file is out of date: ${sourceFile} hashes to ${actual}, the lock file has ${jobConfig.contentHash}`,
      };
    }
  }

  const transform = registerTypeScript(kiciDir, request.runnerDir);
  jobLog(`[workflow-runner] Loading ${sourceFile} (TypeScript transform: ${transform})`);
  const workflowUrl = pathToFileURL(path.join(repoRoot, sourceFile)).href;
  const module = await import(workflowUrl);
  const workflowName = jobConfig.workflowName;
  const workflow = findWorkflow(module, workflowName);
  if (!workflow) throw new Error(`${sourceFile} exports no workflow named '${workflowName}'`);
  const jobName = jobConfig.baseJobName || jobConfig.name;
  const job = jobsOf(workflow).find((j) => j.name === jobName);
  if (!job) throw new Error(`workflow '${workflowName}' has no job named '${jobName}'`);
  const unsupported = unsupportedJobFeature(workflow, job);
  if (unsupported) throw new Unsupported(unsupported);
  const initSpecs = initSpecsOf(job, repoRoot);

  let zx = null;
  try {
    zx = await import(pathToFileURL(createRequire(path.join(kiciDir, 'package.json')).resolve('zx')).href);
  } catch {
    // Steps that use ctx.$ fail with a clear error.
  }
  const run = new JobRun(request, job, workflow, zx);
  const { plan, flat } = planSteps(job, lockStepNames(jobConfig), run.stepRefs);
  let sdk = null;
  try {
    sdk = await import(`kici-agent-sdk-of:${workflowUrl}`);
  } catch {
    // The workflow does not get the SDK from .kici/node_modules: no maps to hand over.
  }
  run.wireOutputMaps(sdk);
  abortHandler = (force) => {
    run.forced = run.forced || force;
    if (force) finish(1);
    run.abort.abort('cancel');
  };
  const result = await run.run(plan, flat, initSpecs);
  fs.rmSync(run.tmp, { recursive: true, force: true });
  return { ...result, outputs: run.outputs };
}

// Until the job runs, an abort ends the runner at once; SIGTERM (the agent's graceful stop of
// the process group) is a graceful abort.
abortHandler = () => finish(1);
process.on('SIGTERM', () => abortHandler(false));

main().then(
  (result) => {
    if (!result.listed) {
      send({ type: 'job.complete', status: result.status, error: result.error, outputs: result.outputs || {} });
    }
    finish(result.status === 'success' ? 0 : 1);
  },
  (error) => {
    const message = error instanceof Error ? error.message : String(error);
    jobLog(`[workflow-runner] [error] Fatal: ${message}`);
    process.stderr.write(`${error instanceof Error ? error.stack : message}\n`);
    send({ type: 'job.complete', status: 'failed', error: message, outputs: {} });
    finish(1);
  },
);
