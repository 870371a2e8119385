// Cross-language conformance client for eglo.
//
// Follows only the published contract: README.md "Message contract", docs/asyncapi.yaml and
// docs/schemas/*.json, all read at run time from REPO_ROOT. It publishes valid and invalid
// requests to a running worker, consumes every event and direct reply, validates each with Ajv
// (draft 2020-12, strict) and checks the AMQP properties, then prints ONE JSON summary line on
// stdout. Diagnostics go to stderr. It exits non-zero only when it crashes or cannot run at all;
// judging the summary is the caller's job (tests/test_conformance_node.py).
//
// Environment:
//   EGLO_AMQP_URL  broker URL (default amqp://guest:guest@127.0.0.1:5672/)
//   REPO_ROOT      repository root holding docs/ (default: two levels above this file)
//   OUT_DIR        where every received message is written as <n>.json (default: a temp dir)
//   COUNT          valid requests per type (default 5)
//   TIMEOUT_S      how long to wait for outcomes and replies (default 90)
//   LINGER_S       how long to keep listening once everything arrived, for extras (default 1)

import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { isDeepStrictEqual } from 'node:util';

import Ajv2020 from 'ajv/dist/2020.js';
import addFormats from 'ajv-formats';
import amqp from 'amqplib';
import YAML from 'yaml';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const env = process.env;
const AMQP_URL = env.EGLO_AMQP_URL || 'amqp://guest:guest@127.0.0.1:5672/';
const REPO_ROOT = path.resolve(env.REPO_ROOT || path.join(HERE, '..', '..'));
const DOCS = path.join(REPO_ROOT, 'docs');
const OUT_DIR = env.OUT_DIR || fs.mkdtempSync(path.join(os.tmpdir(), 'eglo-conformance-'));
const COUNT = Number.parseInt(env.COUNT || '5', 10);
const TIMEOUT_S = Number.parseFloat(env.TIMEOUT_S || '90');
const LINGER_S = Number.parseFloat(env.LINGER_S || '1');

// README "Message contract" / docs/asyncapi.yaml names.
const REQUESTS_EXCHANGE = 'eglo.requests';
const EVENTS_EXCHANGE = 'eglo.events';
const REQUEST_TYPES = ['forecast', 'storage', 'grid_switch', 'simulation'];
const RUN_STATUSES = ['completed', 'failed', 'expired'];
const DEAD_LETTERED = 'request.dead_lettered';
// Which docs/schemas file describes an event, by routing key (README table).
const EVENT_SCHEMA_FILES = [
  [/^run\.[^.]+\.[^.]+$/, 'event.run-outcome.v1.json'],
  [/^embedding\.requested$/, 'event.embedding-requested.v1.json'],
  [/^anomaly\.detected\.[^.]+$/, 'event.anomaly-detected.v1.json'],
];
const DEAD_LETTER_SCHEMA_FILE = 'event.request-dead-lettered.v1.json';
const MAX_ERRORS = 12;

const log = (...args) => console.error('[conformance]', ...args);
const short = (text, n = 400) => (text.length > n ? `${text.slice(0, n)}…` : text);

// ---------------------------------------------------------------------------------------------
// Schemas: docs/schemas/*.json and the AsyncAPI document's components, one strict Ajv instance.
// ---------------------------------------------------------------------------------------------

const ASYNCAPI_ID = 'urn:eglo:asyncapi';

class Contract {
  constructor() {
    this.ajv = new Ajv2020({ strict: true, allErrors: true });
    addFormats(this.ajv);
    this.compileFailures = []; // {source, error}
    this.compiled = []; // sources that compiled
    this.docs = new Map(); // file name -> {id, validate|null}
    this.messages = new Map(); // AsyncAPI component message name -> {payload, headers}
    this.asyncapi = null;
  }

  fail(source, error) {
    const text = error instanceof Error ? error.message : String(error);
    this.compileFailures.push({ source, error: short(text) });
    log(`schema did not compile: ${source}: ${text}`);
  }

  loadDocsSchemas() {
    const dir = path.join(DOCS, 'schemas');
    const files = fs.readdirSync(dir).filter((f) => f.endsWith('.json')).sort();
    const added = [];
    for (const file of files) {
      const source = `docs/schemas/${file}`;
      let schema;
      try {
        schema = JSON.parse(fs.readFileSync(path.join(dir, file), 'utf8'));
      } catch (err) {
        this.fail(source, `not JSON: ${err.message}`);
        continue;
      }
      // request.rules.v1.json lists the cross-field rules: a document, not a JSON Schema.
      if (!schema.$schema) continue;
      const id = schema.$id || `urn:eglo:docs:${file}`;
      try {
        this.ajv.addSchema(schema, schema.$id ? undefined : id);
        added.push([file, id]);
      } catch (err) {
        this.fail(source, err);
        this.docs.set(file, { id, validate: null });
      }
    }
    // Compile only once all are added, so cross-file $refs resolve.
    for (const [file, id] of added) {
      const source = `docs/schemas/${file}`;
      let validate = null;
      try {
        validate = this.ajv.getSchema(id) || null;
        if (!validate) throw new Error(`no schema under ${id}`);
        this.compiled.push(source);
      } catch (err) {
        this.fail(source, err);
      }
      this.docs.set(file, { id, validate });
    }
  }

  /** The docs/schemas file (name) a reference relative to docs/asyncapi.yaml points at. */
  docsRef(ref) {
    const [filePart, fragment] = ref.split('#', 2);
    const file = path.relative(path.join(DOCS, 'schemas'), path.resolve(DOCS, filePart));
    const entry = this.docs.get(file);
    if (!entry || file.includes(path.sep)) return null;
    return fragment ? `${entry.id}#${fragment}` : entry.id;
  }

  /** A copy of an AsyncAPI schema whose $refs point into the Ajv registry. */
  rewrite(node, source, problems) {
    if (Array.isArray(node)) return node.map((n) => this.rewrite(n, source, problems));
    if (node === null || typeof node !== 'object') return node;
    const out = {};
    for (const [key, value] of Object.entries(node)) {
      if (key === '$ref' && typeof value === 'string') {
        if (value.startsWith('#/components/schemas/')) {
          out.$ref = `${ASYNCAPI_ID}#/$defs/${value.slice('#/components/schemas/'.length)}`;
        } else if (value.startsWith('#')) {
          problems.push(`${source}: unsupported local $ref ${value}`);
          out.$ref = value;
        } else {
          const target = this.docsRef(value);
          if (!target) problems.push(`${source}: $ref ${value} is not a docs/schemas file`);
          out.$ref = target || value;
        }
      } else {
        out[key] = this.rewrite(value, source, problems);
      }
    }
    return out;
  }

  /** Follow a local AsyncAPI $ref ("#/a/b") through the document. */
  deref(node) {
    let seen = 0;
    while (node && typeof node === 'object' && typeof node.$ref === 'string') {
      if (!node.$ref.startsWith('#/') || ++seen > 20) return node;
      node = this.pointer(node.$ref);
    }
    return node;
  }

  /** The component message name a channel/operation message $ref ends at. */
  messageName(ref) {
    let node = ref;
    for (let i = 0; i < 20 && node && typeof node.$ref === 'string'; i++) {
      const m = /^#\/components\/messages\/([^/]+)$/.exec(node.$ref);
      if (m) return m[1];
      node = this.pointer(node.$ref); // one hop: a channel message is itself a $ref
    }
    return null;
  }

  /** The node a local "#/a/b" pointer names, without following a $ref found there. */
  pointer(ref) {
    if (!ref.startsWith('#/')) return undefined;
    return ref
      .slice(2)
      .split('/')
      .map((p) => p.replace(/~1/g, '/').replace(/~0/g, '~'))
      .reduce((acc, key) => (acc == null ? acc : acc[key]), this.asyncapi);
  }

  compileSchema(schema, source) {
    const problems = [];
    const rewritten = this.rewrite(schema, source, problems);
    for (const p of problems) this.fail(source, p);
    try {
      const validate = this.ajv.compile(rewritten);
      this.compiled.push(source);
      return validate;
    } catch (err) {
      this.fail(source, err);
      return null;
    }
  }

  loadAsyncApi() {
    const source = 'docs/asyncapi.yaml';
    this.asyncapi = YAML.parse(fs.readFileSync(path.join(DOCS, 'asyncapi.yaml'), 'utf8'));
    const components = this.asyncapi.components || {};
    const problems = [];
    const defs = this.rewrite(components.schemas || {}, `${source} components.schemas`, problems);
    for (const p of problems) this.fail(source, p);
    try {
      this.ajv.addSchema({ $id: ASYNCAPI_ID, $defs: defs });
    } catch (err) {
      this.fail(`${source} components.schemas`, err);
    }
    for (const [name, raw] of Object.entries(components.messages || {})) {
      const message = this.deref(raw) || {};
      const entry = { payload: null, headers: null };
      for (const part of ['payload', 'headers']) {
        let schema = message[part];
        if (schema === undefined) continue;
        const where = `${source} components.messages.${name}.${part}`;
        if (schema && typeof schema === 'object' && 'schemaFormat' in schema) {
          // AsyncAPI 3 multi-format schema object: only JSON Schema flavours are usable here.
          if (!/json|asyncapi/i.test(String(schema.schemaFormat))) {
            this.fail(where, `unsupported schemaFormat ${schema.schemaFormat}`);
            continue;
          }
          schema = schema.schema;
        }
        entry[part] = this.compileSchema(schema, where);
      }
      this.messages.set(name, entry);
    }
  }

  docsValidator(file) {
    return this.docs.get(file) || null;
  }

  /** AsyncAPI channels on eglo.events: {name, regex, params, messages: [component names]}. */
  eventChannels() {
    const out = [];
    for (const [name, raw] of Object.entries(this.asyncapi.channels || {})) {
      const channel = this.deref(raw);
      const address = channel?.address;
      if (typeof address !== 'string') continue;
      const exchange = channel.bindings?.amqp?.exchange?.name;
      if (exchange !== EVENTS_EXCHANGE) continue;
      const params = [];
      const pattern = address
        .split(/(\{[^}]+\})/)
        .map((part) => {
          const m = /^\{([^}]+)\}$/.exec(part);
          if (!m) return part.replace(/[.*+?^$()|[\]\\]/g, '\\$&');
          params.push(m[1]);
          return '([^.]+)';
        })
        .join('');
      const enums = params.map((p) => this.deref(channel.parameters?.[p])?.enum || null);
      const messages = Object.values(channel.messages || {})
        .map((m) => this.messageName(m))
        .filter(Boolean);
      out.push({ name, regex: new RegExp(`^${pattern}$`), enums, messages });
    }
    return out;
  }

  /** Component message names the document declares as replies to requests. */
  replyMessages() {
    const names = new Set();
    for (const raw of Object.values(this.asyncapi.operations || {})) {
      const op = this.deref(raw);
      const reply = this.deref(op?.reply);
      if (!reply) continue;
      for (const m of reply.messages || []) {
        const name = this.messageName(m);
        if (name) names.add(name);
      }
      const channel = this.deref(reply.channel);
      if (!reply.messages && channel) {
        for (const m of Object.values(channel.messages || {})) {
          const name = this.messageName(m);
          if (name) names.add(name);
        }
      }
    }
    return [...names];
  }
}

// ---------------------------------------------------------------------------------------------
// Requests, built from the README and docs/schemas/request.v1.json.
// ---------------------------------------------------------------------------------------------

const round = (x) => Math.round(x * 100) / 100;
const series = (n, base, amp, phase = 0) =>
  Array.from({ length: n }, (_, i) =>
    round(base + amp * Math.sin((2 * Math.PI * (i + phase)) / 24)),
  );

function payloadFor(type, i) {
  switch (type) {
    case 'forecast': {
      const n = 48 + 24 * (i % 3);
      const payload = {
        historical_loads: series(n, 900 + 25 * i, 180, i),
        resolution_minutes: 60,
        horizon_steps: 24,
      };
      if (i % 2 === 0) payload.temperature_c = series(n, 18, 6, i + 3);
      return payload;
    }
    case 'storage': {
      const payload = {
        capacity_kwh: 500,
        max_charge_kw: 100,
        max_discharge_kw: 120,
        efficiency: 0.92,
        soc_initial_kwh: 200 + 10 * i,
        soc_min_kwh: 50,
        soc_max_kwh: 450,
        price_schedule: series(24, 0.2, 0.08, i),
        resolution_minutes: 60,
      };
      if (i % 2 === 1) payload.load_forecast = series(24, 300, 80, i);
      return payload;
    }
    case 'grid_switch':
      return {
        load_forecast: series(24, 2000 + 50 * i, 400, i),
        resolution_minutes: 60,
        sources: [
          { name: 'grid', kind: 'grid', capacity_kw: 5000, cost_per_kwh: 0.25 },
          { name: 'solar-farm', kind: 'solar', capacity_kw: 800, cost_per_kwh: 0.03 },
          { name: 'peaker', kind: 'gas', capacity_kw: 1500, cost_per_kwh: 0.4 },
        ],
      };
    case 'simulation': {
      const baseType = ['forecast', 'storage', 'grid_switch'][i % 3];
      return {
        base: { request_type: baseType, payload: payloadFor(baseType, i) },
        scenarios: [
          { name: 'as-is' },
          { name: 'hot-and-busy', load_scale: 1.15, price_scale: 1.3, temperature_delta_c: 4 },
          { name: 'mild', load_scale: 0.9, temperature_delta_c: -2 },
        ],
      };
    }
    default:
      throw new Error(`no payload for ${type}`);
  }
}

function requestFor(runId, type, i) {
  const now = Date.now();
  const doc = {
    schema_version: 1,
    request_id: `conf-${runId}-${type}-${i}`,
    request_type: type,
    region: 'California',
    forecast_date: new Date(now).toISOString().slice(0, 10),
    payload: payloadFor(type, i),
  };
  // Every fifth (and the last, so COUNT >= 1 always has one) has a deadline in the past.
  const expired = i % 5 === 4 || i === COUNT - 1;
  if (expired) doc.deadline = new Date(now - 3600_000).toISOString();
  else if (i % 2 === 1) doc.deadline = new Date(now + 3600_000).toISOString();
  return { doc, expired };
}

// ---------------------------------------------------------------------------------------------
// The run.
// ---------------------------------------------------------------------------------------------

function jsonSafe(_key, value) {
  if (typeof value === 'bigint') return value.toString();
  if (value && value.type === 'Buffer' && Array.isArray(value.data)) {
    return { buffer_base64: Buffer.from(value.data).toString('base64') };
  }
  return value;
}

async function main() {
  const started = Date.now();
  const runId = randomUUID().slice(0, 8);
  fs.mkdirSync(OUT_DIR, { recursive: true });

  const contract = new Contract();
  contract.loadDocsSchemas();
  contract.loadAsyncApi();
  const eventChannels = contract.eventChannels();
  const replyMessageNames = contract.replyMessages();

  const summary = {
    run_id: runId,
    count_per_type: COUNT,
    published: Object.fromEntries(REQUEST_TYPES.map((t) => [t, 0])),
    published_invalid: {},
    published_duplicate: 0,
    published_with_reply_to: 0,
    publish_confirms: { acked: 0, nacked: 0 },
    returned_unroutable: 0,
    valid_requests: 0,
    valid_with_outcome: 0,
    missing_outcomes: [],
    outcome_events: Object.fromEntries(RUN_STATUSES.map((s) => [s, 0])),
    outcome_events_by_type: {},
    expected_expired: 0,
    status_mismatches: [],
    requests_with_several_outcomes: [],
    events_received: 0,
    event_duplicates_dropped: 0,
    events_by_kind: {},
    foreign_outcome_events: 0,
    reply_to_requests: 0,
    replies_received: 0,
    replies: { completed: 0, failed: 0, expired: 0, dead_lettered: 0, duplicate: 0, unknown: 0 },
    missing_replies: [],
    missing_replies_count: 0,
    extra_replies: 0,
    uncorrelated_replies: 0,
    invalid_cases: {},
    duplicate_case: null,
    ajv: {
      schemas_compiled: 0,
      compile_failures: 0,
      compile_errors: [],
      validated: 0,
      failed: 0,
      errors: [],
      reply_messages_in_asyncapi: replyMessageNames,
    },
    request_self_check: {
      valid_accepted: 0,
      valid_rejected: 0,
      invalid_rejected: 0,
      invalid_accepted: 0,
      unchecked: 0,
      errors: [],
    },
    property_checks: 0,
    property_failures: 0,
    property_failures_by_check: {},
    property_errors: [],
    consistency_failures: 0,
    consistency_errors: [],
    timed_out: false,
    elapsed_s: 0,
    out_dir: OUT_DIR,
    fatal: null,
  };

  const pushLimited = (list, text) => {
    if (list.length < MAX_ERRORS) list.push(short(text));
  };
  const propertyFail = (check, n, text) => {
    summary.property_failures += 1;
    const byCheck = summary.property_failures_by_check;
    byCheck[check] = (byCheck[check] || 0) + 1;
    pushLimited(summary.property_errors, `#${n} ${check}: ${text}`);
  };
  const consistencyFail = (text) => {
    summary.consistency_failures += 1;
    pushLimited(summary.consistency_errors, text);
  };

  // --- Request self-check against the request schemas (docs + AsyncAPI). -----------------------
  const requestValidators = [];
  const docsRequest = contract.docsValidator('request.v1.json');
  requestValidators.push(['docs/schemas/request.v1.json', docsRequest?.validate || null]);
  const asyncRequest = contract.messages.get('OptimizationRequest');
  requestValidators.push(['asyncapi OptimizationRequest', asyncRequest?.payload || null]);
  const selfCheck = (doc, shouldPass, label) => {
    for (const [name, validate] of requestValidators) {
      if (!validate) {
        summary.request_self_check.unchecked += 1;
        continue;
      }
      const ok = validate(doc);
      const bucket = shouldPass
        ? ok ? 'valid_accepted' : 'valid_rejected'
        : ok ? 'invalid_accepted' : 'invalid_rejected';
      summary.request_self_check[bucket] += 1;
      if (ok !== shouldPass) {
        const why = ok
          ? 'accepted'
          : contract.ajv.errorsText(validate.errors, { dataVar: 'request' });
        pushLimited(summary.request_self_check.errors, `${label} vs ${name}: ${why}`);
      }
    }
  };

  // --- Broker. ----------------------------------------------------------------------------------
  const connection = await amqp.connect(AMQP_URL);
  connection.on('error', (err) => log('connection error', err.message));

  // Passive checks only: the worker owns its topology.
  try {
    const probe = await connection.createChannel();
    await probe.checkExchange(REQUESTS_EXCHANGE);
    await probe.checkExchange(EVENTS_EXCHANGE);
    await probe.close();
  } catch (err) {
    summary.fatal = `topology missing (is the worker running?): ${err.message}`;
    finish(summary, contract, started);
    await connection.close().catch(() => {});
    process.exitCode = 1;
    return;
  }

  const channel = await connection.createConfirmChannel();
  channel.on('error', (err) => log('channel error', err.message));
  channel.on('return', (msg) => {
    summary.returned_unroutable += 1;
    log('returned unroutable', msg.fields.routingKey, msg.fields.replyText);
  });
  // Our own exclusive queues: one bound to every event before anything is published, one for
  // direct replies.
  const ours = { exclusive: true, autoDelete: true };
  const { queue: eventQueue } = await channel.assertQueue('', ours);
  await channel.bindQueue(eventQueue, EVENTS_EXCHANGE, '#');
  const { queue: replyQueue } = await channel.assertQueue('', ours);

  // --- State. -----------------------------------------------------------------------------------
  const valid = new Map(); // request_id -> {type, expired, body (Buffer), outcomes: [body]}
  // correlation_id -> {kind: valid|invalid|duplicate, case, request_id, replies: []}
  const byCorrelation = new Map();
  const seenEvents = new Set();
  let received = 0;
  let duplicate = null; // {request_id, published}: re-sent once its original has an outcome

  const publish = (routingKey, body, messageId, replyTo) => {
    const correlationId = replyTo ? `corr-${runId}-${randomUUID()}` : undefined;
    const options = {
      mandatory: true,
      persistent: true,
      contentType: 'application/json',
      messageId,
      timestamp: Math.floor(Date.now() / 1000),
    };
    if (replyTo) {
      options.replyTo = replyQueue;
      options.correlationId = correlationId;
      summary.published_with_reply_to += 1;
    }
    channel.publish(REQUESTS_EXCHANGE, routingKey, body, options, (err) => {
      if (err) summary.publish_confirms.nacked += 1;
      else summary.publish_confirms.acked += 1;
    });
    return correlationId;
  };

  // --- Completion. ------------------------------------------------------------------------------
  let resolveDone;
  const done = new Promise((resolve) => {
    resolveDone = resolve;
  });
  const complete = () => {
    if (!duplicate?.published) return false;
    for (const entry of valid.values()) if (entry.outcomes.length === 0) return false;
    for (const entry of byCorrelation.values()) if (entry.replies.length === 0) return false;
    return true;
  };
  const checkDone = () => {
    if (complete()) resolveDone('complete');
  };

  const maybePublishDuplicate = (requestId) => {
    if (!duplicate || duplicate.published || duplicate.request_id !== requestId) return;
    duplicate.published = true;
    const entry = valid.get(requestId);
    // The same bytes again, with a reply_to of its own: the contract's duplicate.
    const correlationId = publish(`request.${entry.type}`, entry.body, requestId, true);
    byCorrelation.set(correlationId, {
      kind: 'duplicate',
      case: 'duplicate',
      request_id: requestId,
      replies: [],
    });
    summary.published_duplicate += 1;
    channel.waitForConfirms().catch((err) => log('duplicate not confirmed', err.message));
  };

  // --- Receiving. -------------------------------------------------------------------------------
  const record = (source, msg, body, extra) => {
    received += 1;
    const n = received;
    const file = path.join(OUT_DIR, `${String(n).padStart(4, '0')}.json`);
    const props = { ...msg.properties };
    const doc = {
      n,
      source,
      exchange: msg.fields.exchange,
      routing_key: msg.fields.routingKey,
      redelivered: msg.fields.redelivered,
      properties: props,
      body,
      ...extra,
    };
    fs.writeFileSync(file, `${JSON.stringify(doc, jsonSafe, 2)}\n`);
    return n;
  };

  const parseBody = (msg) => {
    try {
      return { ok: true, value: JSON.parse(msg.content.toString('utf8')) };
    } catch {
      return { ok: false, value: msg.content.toString('utf8') };
    }
  };

  const runValidators = (n, label, body, validators) => {
    // validators: [[name, validate|null]] all of which must pass; null = did not compile.
    const errors = [];
    for (const [name, validate] of validators) {
      if (!validate) {
        errors.push(`${name}: schema did not compile`);
      } else if (!validate(body)) {
        const text = validate.combined
          ? validate.errors.map((e) => e.message).join(' / ')
          : contract.ajv.errorsText(validate.errors, { dataVar: 'body' });
        errors.push(`${name}: ${text}`);
      }
    }
    if (errors.length === 0) summary.ajv.validated += 1;
    else {
      summary.ajv.failed += 1;
      pushLimited(summary.ajv.errors, `#${n} ${label}: ${errors.join(' | ')}`);
    }
  };

  /** Any one of the declared messages passes ("oneOf the channel's messages"). */
  const anyOfMessages = (label, names) => {
    const candidates = names.map((name) => [name, contract.messages.get(name)?.payload || null]);
    if (candidates.length === 0) return [[`asyncapi (no message declared for ${label})`, null]];
    const combined = (body) => {
      const failures = [];
      for (const [name, validate] of candidates) {
        if (!validate) {
          failures.push({ message: `${name}: schema did not compile` });
          continue;
        }
        if (validate(body)) {
          combined.errors = null;
          return true;
        }
        failures.push({
          message: `${name}: ${contract.ajv.errorsText(validate.errors, { dataVar: 'body' })}`,
        });
      }
      combined.errors = failures;
      return false;
    };
    combined.combined = true;
    return [[`asyncapi ${names.join('|')}`, combined]];
  };

  const checkCommonProperties = (n, msg, body) => {
    const p = msg.properties;
    const checks = [
      ['content_type', p.contentType === 'application/json', `contentType=${p.contentType}`],
      ['delivery_mode', p.deliveryMode === 2, `deliveryMode=${p.deliveryMode}`],
      ['timestamp', typeof p.timestamp === 'number' && p.timestamp > 0, `timestamp=${p.timestamp}`],
      [
        'message_id',
        body?.event_id !== undefined && p.messageId === body.event_id,
        `messageId=${p.messageId} event_id=${body?.event_id}`,
      ],
      [
        'type',
        body?.event_type !== undefined && p.type === body.event_type,
        `type=${p.type} event_type=${body?.event_type}`,
      ],
    ];
    for (const [name, ok, detail] of checks) {
      summary.property_checks += 1;
      if (!ok) propertyFail(name, n, detail);
    }
  };

  const onEvent = (msg) => {
    const parsed = parseBody(msg);
    const rk = msg.fields.routingKey;
    const duplicateEvent = parsed.ok && seenEvents.has(parsed.value?.event_id);
    const n = record('event', msg, parsed.value, { duplicate_event: duplicateEvent });
    channel.ack(msg);
    summary.events_received += 1;
    if (!parsed.ok) {
      propertyFail('json_body', n, `event ${rk} body is not JSON`);
      summary.ajv.failed += 1;
      pushLimited(summary.ajv.errors, `#${n} ${rk}: body is not JSON`);
      return;
    }
    const body = parsed.value;
    checkCommonProperties(n, msg, body);
    summary.property_checks += 1;
    if (body.event_type !== rk) {
      propertyFail('event_type_is_routing_key', n, `${body.event_type} vs ${rk}`);
    }

    // ajv: the docs/schemas file for this routing key, and the AsyncAPI channel's message.
    const validators = [];
    const fileMatch = EVENT_SCHEMA_FILES.find(([re]) => re.test(rk));
    if (!fileMatch) validators.push([`docs/schemas (none for routing key ${rk})`, null]);
    else {
      const docs = contract.docsValidator(fileMatch[1]);
      validators.push([`docs/schemas/${fileMatch[1]}`, docs?.validate || null]);
    }
    const channels = eventChannels.filter((c) => {
      const m = c.regex.exec(rk);
      return m && c.enums.every((e, i) => !e || e.includes(m[i + 1]));
    });
    validators.push(...anyOfMessages(`routing key ${rk}`, channels.flatMap((c) => c.messages)));
    runValidators(n, rk, body, validators);

    if (duplicateEvent) {
      summary.event_duplicates_dropped += 1;
      return;
    }
    if (typeof body.event_id === 'string') seenEvents.add(body.event_id);
    const kind = rk.split('.').slice(0, 2).join('.');
    summary.events_by_kind[kind] = (summary.events_by_kind[kind] || 0) + 1;

    const m = /^run\.([^.]+)\.([^.]+)$/.exec(rk);
    if (!m) return;
    const [, status, type] = m;
    const entry = valid.get(body.request_id);
    if (!entry) {
      // Not one of ours as a valid request (another producer, or an "invalid" one the worker ran).
      summary.foreign_outcome_events += 1;
      const inv = [...byCorrelation.values()].find((c) => c.request_id === body.request_id);
      if (inv) inv.outcome_event = rk;
      return;
    }
    summary.outcome_events[status] = (summary.outcome_events[status] || 0) + 1;
    const byType = (summary.outcome_events_by_type[type] ||= {});
    byType[status] = (byType[status] || 0) + 1;
    if (body.status !== status) consistencyFail(`#${n} ${rk}: body status ${body.status}`);
    if (body.request_type !== type || entry.type !== type) {
      consistencyFail(`#${n} ${rk}: request_type ${body.request_type}, sent ${entry.type}`);
    }
    const wanted = entry.expired ? 'expired' : null;
    if (wanted && status !== wanted) {
      summary.status_mismatches.push(`${body.request_id}: deadline passed but ${status}`);
    } else if (!wanted && status === 'expired') {
      summary.status_mismatches.push(`${body.request_id}: expired without a passed deadline`);
    }
    entry.outcomes.push(body);
    if (entry.outcomes.length === 2) summary.requests_with_several_outcomes.push(body.request_id);
    maybePublishDuplicate(body.request_id);
    checkDone();
  };

  const onReply = (msg) => {
    const parsed = parseBody(msg);
    const corr = msg.properties.correlationId;
    const entry = corr !== undefined ? byCorrelation.get(corr) : undefined;
    const n = record('reply', msg, parsed.value, { case: entry?.case ?? null });
    channel.ack(msg);
    summary.replies_received += 1;
    summary.property_checks += 1;
    if (!entry) {
      summary.uncorrelated_replies += 1;
      propertyFail('correlation_id', n, `reply correlationId=${corr} matches no request sent`);
    }
    if (!parsed.ok) {
      propertyFail('json_body', n, 'reply body is not JSON');
      summary.ajv.failed += 1;
      pushLimited(summary.ajv.errors, `#${n} reply: body is not JSON`);
      if (entry) entry.replies.push({ outcome: 'unknown' });
      checkDone();
      return;
    }
    const body = parsed.value;
    checkCommonProperties(n, msg, body);

    const deadLettered = body.event_type === DEAD_LETTERED;
    const validators = [];
    if (deadLettered) {
      const docs = contract.docsValidator(DEAD_LETTER_SCHEMA_FILE);
      const name = `docs/schemas/${DEAD_LETTER_SCHEMA_FILE}${docs ? '' : ' (no such file)'}`;
      validators.push([name, docs?.validate || null]);
    } else {
      const docs = contract.docsValidator('event.run-outcome.v1.json');
      validators.push(['docs/schemas/event.run-outcome.v1.json', docs?.validate || null]);
    }
    validators.push(...anyOfMessages('replies', replyMessageNames));
    runValidators(n, `reply ${body.event_type}`, body, validators);

    let outcome;
    if (deadLettered) outcome = 'dead_lettered';
    else if (entry?.kind === 'duplicate') outcome = 'duplicate';
    else if (RUN_STATUSES.includes(body.status)) outcome = body.status;
    else outcome = 'unknown';
    summary.replies[outcome] += 1;
    if (!entry) return;
    if (entry.replies.length >= 1) summary.extra_replies += 1;
    entry.replies.push({ outcome, body });
    if (entry.request_id && body.request_id !== undefined && body.request_id !== entry.request_id) {
      consistencyFail(`#${n} reply for ${entry.request_id} names request_id ${body.request_id}`);
    }
    checkDone();
  };

  await channel.consume(eventQueue, onEvent, { noAck: false });
  await channel.consume(replyQueue, onReply, { noAck: false });

  // --- Publishing: valid requests, invalid ones, then (after its outcome) one duplicate. --------
  let replyToggle = 0;
  for (const type of REQUEST_TYPES) {
    for (let i = 0; i < COUNT; i++) {
      const { doc, expired } = requestFor(runId, type, i);
      selfCheck(doc, true, doc.request_id);
      const withReply = replyToggle++ % 2 === 0;
      const body = Buffer.from(JSON.stringify(doc));
      valid.set(doc.request_id, { type, expired, body, outcomes: [] });
      const correlationId = publish(`request.${type}`, body, doc.request_id, withReply);
      if (withReply) {
        byCorrelation.set(correlationId, {
          kind: 'valid',
          case: `valid ${type}`,
          request_id: doc.request_id,
          replies: [],
        });
        if (!duplicate && !expired) duplicate = { request_id: doc.request_id, published: false };
      }
      summary.published[type] += 1;
      summary.valid_requests += 1;
      if (expired) summary.expected_expired += 1;
    }
  }

  const invalid = [];
  {
    const id = `conf-${runId}-bad-json`;
    invalid.push({
      case: 'not_json',
      reason: 'invalid_json',
      rk: 'request.forecast',
      id,
      body: Buffer.from(`{"request_id": "${id}", "request_type": "forecast", oops`),
    });
  }
  {
    const { doc } = requestFor(runId, 'forecast', 0);
    doc.request_id = `conf-${runId}-bad-type`;
    delete doc.deadline;
    doc.payload.horizon_steps = '24';
    selfCheck(doc, false, `${doc.request_id} (horizon_steps "24")`);
    invalid.push({
      case: 'wrong_field_type',
      reason: 'invalid_request',
      rk: 'request.forecast',
      id: doc.request_id,
      body: Buffer.from(JSON.stringify(doc)),
    });
  }
  {
    const { doc } = requestFor(runId, 'forecast', 0);
    doc.request_id = `conf-${runId}-bad-kind`;
    doc.request_type = 'teleport';
    delete doc.deadline;
    selfCheck(doc, false, `${doc.request_id} (request_type teleport)`);
    invalid.push({
      case: 'unknown_request_type',
      reason: 'unknown_request_type',
      rk: 'request.teleport',
      id: doc.request_id,
      body: Buffer.from(JSON.stringify(doc)),
    });
  }
  for (const bad of invalid) {
    const correlationId = publish(bad.rk, bad.body, bad.id, true);
    byCorrelation.set(correlationId, {
      kind: 'invalid',
      case: bad.case,
      expected_reason: bad.reason,
      request_id: bad.id,
      replies: [],
    });
    summary.published_invalid[bad.case] = 1;
  }
  summary.reply_to_requests = byCorrelation.size + (duplicate ? 1 : 0);

  await channel.waitForConfirms();
  log(`published ${summary.valid_requests} valid + ${invalid.length} invalid; confirmed`);
  if (!duplicate) log('no duplicate candidate (COUNT too small?)');
  // An outcome that arrived before the loop above finished may already allow the duplicate.
  if (duplicate && valid.get(duplicate.request_id)?.outcomes.length) {
    maybePublishDuplicate(duplicate.request_id);
  }
  if (!duplicate) duplicate = { published: true }; // nothing to wait for
  checkDone();

  const timer = setTimeout(() => resolveDone('timeout'), TIMEOUT_S * 1000);
  const how = await done;
  clearTimeout(timer);
  summary.timed_out = how === 'timeout';
  if (!summary.timed_out && LINGER_S > 0) {
    await new Promise((r) => setTimeout(r, LINGER_S * 1000)); // extras: duplicates, second replies
  }

  // --- Tally. -----------------------------------------------------------------------------------
  for (const [id, entry] of valid) {
    if (entry.outcomes.length > 0) summary.valid_with_outcome += 1;
    else if (summary.missing_outcomes.length < MAX_ERRORS) summary.missing_outcomes.push(id);
  }
  for (const entry of byCorrelation.values()) {
    if (entry.replies.length === 0) summary.missing_replies_count += 1;
    if (entry.replies.length === 0 && summary.missing_replies.length < MAX_ERRORS) {
      summary.missing_replies.push(`${entry.case}: ${entry.request_id}`);
    }
    if (entry.kind === 'invalid') {
      const first = entry.replies[0];
      summary.invalid_cases[entry.case] = {
        request_id: entry.request_id,
        expected_reason: entry.expected_reason,
        reply: first?.outcome ?? null,
        reason: first?.body?.reason ?? null,
        reply_request_id: first?.body?.request_id ?? null,
        outcome_event: entry.outcome_event ?? null,
      };
    }
    if (entry.kind === 'duplicate') {
      const original = valid.get(entry.request_id)?.outcomes[0] ?? null;
      const first = entry.replies[0];
      summary.duplicate_case = {
        request_id: entry.request_id,
        reply: first?.outcome ?? null,
        same_body_as_original_outcome:
          first && original ? isDeepStrictEqual(first.body, original) : null,
        same_event_id: first && original ? first.body?.event_id === original.event_id : null,
      };
    }
  }
  if (!summary.duplicate_case && summary.published_duplicate === 0 && COUNT > 0) {
    summary.duplicate_case = { request_id: null, reply: null, note: 'duplicate never published' };
  }

  await channel.close().catch(() => {});
  await connection.close().catch(() => {});
  finish(summary, contract, started);
}

function finish(summary, contract, started) {
  summary.ajv.schemas_compiled = contract.compiled.length;
  summary.ajv.compile_failures = contract.compileFailures.length;
  summary.ajv.compile_errors = contract.compileFailures
    .slice(0, MAX_ERRORS)
    .map((f) => `${f.source}: ${f.error}`);
  summary.elapsed_s = Math.round((Date.now() - started) / 100) / 10;
  process.stdout.write(`${JSON.stringify(summary)}\n`);
}

export { Contract, requestFor };

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main().catch((err) => {
    log('crashed:', err?.stack || err);
    process.exit(2);
  });
}
