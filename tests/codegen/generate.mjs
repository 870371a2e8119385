// Generate TypeScript and Go models from eglo's AsyncAPI document with AsyncAPI Modelina, and lay
// out the two decoders beside them.
//
//   node tests/codegen/generate.mjs OUT_DIR [ASYNCAPI_FILE]
//
// ASYNCAPI_FILE defaults to this repository's docs/asyncapi.yaml. Nothing generated is committed:
// tests/test_codegen.py generates into a temporary directory from the committed document.
//
// OUT_DIR/ts/*.ts           Modelina TypeScript classes with marshal()/unmarshal()
// OUT_DIR/registry.ts       the event models decode.ts routes to (static imports, so tsc checks
//                           that each is a class with unmarshal() and marshal())
// OUT_DIR/decode.ts         copy of tests/codegen/decode.ts
// OUT_DIR/tsconfig.json     strict, CommonJS, emits to OUT_DIR/build
// OUT_DIR/go/*.go           Modelina Go structs, package models (module "eglomodels"), JSON tags
// OUT_DIR/go/go.mod         no requirements: builds with the standard library only
// OUT_DIR/go/decode/        copy of tests/codegen/decode_go/main.go and its routes.go
//
// Prints one JSON line: the document, the TypeScript and Go model names, and the routes.

import { copyFile, mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { Parser } from '@asyncapi/parser';
import {
  GO_COMMON_PRESET,
  GoFileGenerator,
  TS_COMMON_PRESET,
  TypeScriptFileGenerator,
  typeScriptDefaultPropertyKeyConstraints,
} from '@asyncapi/modelina';

const here = path.dirname(fileURLToPath(import.meta.url));
const [outArg, docArg] = process.argv.slice(2);
if (!outArg) {
  console.error('usage: node generate.mjs OUT_DIR [ASYNCAPI_FILE]');
  process.exit(2);
}
const outDir = path.resolve(outArg);
const docPath = path.resolve(docArg ?? path.join(here, '..', '..', 'docs', 'asyncapi.yaml'));

// Which model decodes which event_type (a pattern ending in "." is a prefix). The dead-letter
// reply model is optional: whatever schema of the document announces request.dead_lettered.
const ROUTES = [
  ['run.', 'RunOutcome'],
  ['embedding.requested', 'EmbeddingRequested'],
  ['anomaly.detected.', 'AnomalyDetected'],
  ['request.dead_lettered', null],
];
const DEAD_LETTER_EVENT = 'request.dead_lettered';

// Parse (and validate) with the AsyncAPI parser first: Modelina takes the parsed document, and a
// document the parser rejects is a finding of its own, reported with the parser's diagnostics.
const parser = new Parser();
const { document, diagnostics } = await parser.parse(await readFile(docPath, 'utf8'));
const errors = diagnostics.filter((d) => d.severity === 0);
if (!document || errors.length > 0) {
  console.error(`${docPath}: the AsyncAPI parser rejects the document`);
  for (const d of errors) console.error(`  ${d.path.join('.')}: ${d.message}`);
  process.exit(1);
}

const tsDir = path.join(outDir, 'ts');
const goDir = path.join(outDir, 'go');
await rm(outDir, { recursive: true, force: true });
await mkdir(tsDir, { recursive: true });
await mkdir(path.join(goDir, 'decode'), { recursive: true });

// Two departures from Modelina's TypeScript defaults, both about the types, not the wire format:
// - property names stay the JSON names: by default every name on Modelina's JavaScript
//   reserved-word list (which holds browser globals such as `status` and `name`) is renamed to
//   `reservedStatus`, `reservedName`; only `constructor` really cannot be a class member name
//   (in Modelina 5.10.1 `useJavascriptReservedKeywords: false` does not stop the renaming);
// - free-form objects (`result`, `details`) are typed Record<string, any>: unmarshal() leaves
//   them plain objects, so the default Map<string, any> type would be a lie (`.get()` throws).
const ts = new TypeScriptFileGenerator({
  modelType: 'class',
  enumType: 'enum',
  mapType: 'record',
  constraints: {
    propertyKey: typeScriptDefaultPropertyKeyConstraints({
      NO_RESERVED_KEYWORDS: (name) => (name === 'constructor' ? 'reservedConstructor' : name),
    }),
  },
  presets: [{ preset: TS_COMMON_PRESET, options: { marshalling: true } }],
});
const tsModels = await ts.generateToFiles(document, tsDir, { exportType: 'named' }, true);

const go = new GoFileGenerator({
  presets: [{ preset: GO_COMMON_PRESET, options: { addJsonTag: true } }],
});
const goModels = await go.generateToFiles(document, goDir, { packageName: 'models' }, true);

const tsNames = new Set(tsModels.map((m) => m.modelName));
const goNames = new Set(goModels.map((m) => m.modelName));

// The schema (components.schemas key or title) whose event_type mentions request.dead_lettered,
// or failing that one named like a dead-letter reply that has an event_type at all.
function deadLetterModel(names) {
  const schemas = Object.entries(document.json().components?.schemas ?? {});
  const candidates = [];
  for (const [key, schema] of schemas) {
    const eventType = schema?.properties?.event_type;
    if (eventType === undefined) continue;
    const announces = JSON.stringify(eventType).includes(DEAD_LETTER_EVENT);
    if (announces || /dead.?letter/i.test(key)) {
      candidates.push({ announces, names: [key, schema.title].filter(Boolean) });
    }
  }
  candidates.sort((a, b) => Number(b.announces) - Number(a.announces));
  for (const candidate of candidates) {
    for (const name of candidate.names) {
      const pascal = name.replace(/(^|[^A-Za-z0-9])([A-Za-z0-9])/g, (_, __, c) => c.toUpperCase());
      if (names.has(name)) return name;
      if (names.has(pascal)) return pascal;
    }
  }
  return null;
}

function routesFor(names) {
  return ROUTES.map(([pattern, model]) => {
    const name = model ?? deadLetterModel(names);
    return [pattern, name, name !== null && names.has(name) ? name : null];
  });
}

// TypeScript: registry.ts, decode.ts, tsconfig.json.
const tsRoutes = routesFor(tsNames);
const imports = tsRoutes
  .filter(([, , name]) => name !== null)
  .map(([, , name]) => `import { ${name} } from './ts/${name}';`);
const tsEntries = tsRoutes.map(
  ([pattern, model, name]) => `  [${JSON.stringify(pattern)}, ${JSON.stringify(model)}, ${name}],`,
);
await writeFile(
  path.join(outDir, 'registry.ts'),
  [
    '// Generated by tests/codegen/generate.mjs: the models decode.ts routes event types to.',
    ...new Set(imports),
    '',
    'export interface Codec {',
    '  unmarshal(json: string | object): { marshal(): string };',
    '}',
    '',
    'export const ROUTES: Array<[string, string | null, Codec | null]> = [',
    ...tsEntries,
    '];',
    '',
  ].join('\n'),
);
await copyFile(path.join(here, 'decode.ts'), path.join(outDir, 'decode.ts'));
await writeFile(path.join(outDir, 'package.json'), '{"type": "commonjs"}\n');
await writeFile(
  path.join(outDir, 'tsconfig.json'),
  JSON.stringify(
    {
      compilerOptions: {
        strict: true,
        target: 'ES2022',
        module: 'commonjs',
        moduleResolution: 'node10',
        lib: ['ES2022'],
        types: ['node'],
        typeRoots: [path.join(here, 'node_modules', '@types')],
        outDir: 'build',
        rootDir: '.',
        skipLibCheck: true,
        noEmitOnError: false,
      },
      include: ['decode.ts', 'registry.ts', 'ts/**/*.ts'],
    },
    null,
    2,
  ),
);

// Go: go.mod, decode/main.go, decode/routes.go.
await writeFile(path.join(goDir, 'go.mod'), 'module eglomodels\n\ngo 1.19\n');
await copyFile(path.join(here, 'decode_go', 'main.go'), path.join(goDir, 'decode', 'main.go'));
const goRoutes = routesFor(goNames);
const goEntries = goRoutes.map(([pattern, model, name]) => {
  const make = name === null ? 'nil' : `func() any { return &models.${name}{} }`;
  return `\t{${JSON.stringify(pattern)}, ${JSON.stringify(model ?? '')}, ${make}},`;
});
const usesModels = goRoutes.some(([, , name]) => name !== null);
await writeFile(
  path.join(goDir, 'decode', 'routes.go'),
  [
    '// Generated by tests/codegen/generate.mjs: the models decode routes event types to.',
    'package main',
    '',
    usesModels ? 'import models "eglomodels"\n' : '',
    'var routes = []route{',
    ...goEntries,
    '}',
    '',
  ].join('\n'),
);

console.log(
  JSON.stringify({
    document: docPath,
    ts: [...tsNames].sort(),
    go: [...goNames].sort(),
    routes: { ts: tsRoutes, go: goRoutes },
  }),
);
