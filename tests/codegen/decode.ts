// Round-trips captured eglo messages through the TypeScript models Modelina generated.
//
//   node OUT_DIR/build/decode.js MESSAGES_DIR
//
// generate.mjs copies this file to OUT_DIR/decode.ts beside OUT_DIR/registry.ts (which imports
// the generated classes) and OUT_DIR/tsconfig.json; tsc --strict compiles the lot. Every
// MESSAGES_DIR/*.json is {"routing_key", "properties", "body"}; the body's event_type picks the
// model, Model.unmarshal(body).marshal() is parsed again and compared with the body. Prints one
// JSON line: {"decoder": "ts", "messages", "decoded", "lossless", "lossy", "failures": [...]}.

import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';

import { Codec, ROUTES } from './registry';

type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

interface Failure {
  file: string;
  event_type: string;
  model: string | null;
  error?: string;
  paths: string[];
}

const MAX_PATHS = 8;
const MAX_FAILURES = 10;

// A field path without its array indices and remark: "result.scenarios[].forecast".
function field(path: string): string {
  return path.replace(/\[\d+\]/g, '[]').replace(/ \(.*$/, '');
}

function isObject(value: Json): value is { [key: string]: Json } {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function describe(value: Json | undefined): string {
  const text = value === undefined ? 'missing' : JSON.stringify(value);
  return text.length > 60 ? `${text.slice(0, 57)}...` : text;
}

// Every path of `original` that is missing from `copy` or differs there (numbers numerically).
function lost(original: Json, copy: Json | undefined, path: string, out: string[]): void {
  if (copy === undefined) {
    out.push(`${path} (missing)`);
    return;
  }
  if (isObject(original)) {
    if (!isObject(copy)) {
      out.push(`${path} (${describe(copy)} instead of an object)`);
      return;
    }
    for (const key of Object.keys(original)) {
      lost(original[key], copy[key], path === '' ? key : `${path}.${key}`, out);
    }
    return;
  }
  if (Array.isArray(original)) {
    if (!Array.isArray(copy)) {
      out.push(`${path} (${describe(copy)} instead of an array)`);
      return;
    }
    if (copy.length !== original.length) {
      out.push(`${path} (${copy.length} items instead of ${original.length})`);
    }
    original.forEach((item, i) => lost(item, copy[i], `${path}[${i}]`, out));
    return;
  }
  if (typeof original === 'number' && typeof copy === 'number') {
    if (original !== copy) out.push(`${path} (${copy} instead of ${original})`);
    return;
  }
  if (original !== copy) {
    out.push(`${path} (${describe(copy)} instead of ${describe(original)})`);
  }
}

function route(eventType: string): [string | null, Codec | null] | undefined {
  for (const [pattern, model, codec] of ROUTES) {
    const matches = pattern.endsWith('.') ? eventType.startsWith(pattern) : eventType === pattern;
    if (matches) return [model, codec];
  }
  return undefined;
}

function main(): void {
  const dir = process.argv[2];
  if (!dir) {
    console.error('usage: node decode.js MESSAGES_DIR');
    process.exit(2);
  }
  const files = readdirSync(dir).filter((f) => f.endsWith('.json')).sort();
  let decoded = 0;
  let lossless = 0;
  const failures: Failure[] = [];
  for (const file of files) {
    const message = JSON.parse(readFileSync(join(dir, file), 'utf8')) as { body: Json };
    const body = message.body;
    const eventType = isObject(body) && typeof body.event_type === 'string' ? body.event_type : '';
    const [model, codec] = route(eventType) ?? [null, null];
    if (codec === null) {
      failures.push({ file, event_type: eventType, model, error: 'no model', paths: [] });
      continue;
    }
    let copy: Json;
    try {
      copy = JSON.parse(codec.unmarshal(JSON.parse(JSON.stringify(body)) as object).marshal());
    } catch (error) {
      failures.push({ file, event_type: eventType, model, error: String(error), paths: [] });
      continue;
    }
    decoded += 1;
    const paths: string[] = [];
    lost(body, copy, '', paths);
    if (paths.length === 0) {
      lossless += 1;
    } else {
      failures.push({ file, event_type: eventType, model, paths });
    }
  }
  const lostFields: { [field: string]: number } = {};
  for (const failure of failures) {
    const fields = new Set(failure.paths.map(field));
    if (failure.error === 'no model') fields.add(`<no model for ${failure.event_type}>`);
    else if (failure.error !== undefined) fields.add(`<${failure.model} does not decode>`);
    for (const f of fields) lostFields[f] = (lostFields[f] ?? 0) + 1;
  }
  const summary = {
    decoder: 'ts',
    messages: files.length,
    decoded,
    lossless,
    lossy: files.length - lossless,
    lost_fields: lostFields,
    failures: failures
      .slice(0, MAX_FAILURES)
      .map((f) => ({ ...f, paths: f.paths.slice(0, MAX_PATHS) })),
  };
  console.log(JSON.stringify(summary));
}

main();
