// An independent Node.js client of the ICE services. It knows nothing but the contract: it loads the .proto
// files (protos/ice/** and googleapis' google/longrunning, google/rpc, google/api from the google-proto-files
// package) with @grpc/proto-loader and calls the services with @grpc/grpc-js. No generated code, no Python.
//
//   node client.js --localizer HOST:PORT --learner HOST:PORT --evaluator HOST:PORT --image PHOTO.png
//
// Calls: Localize (the photo) -> CreateLearningJob (its concepts, a tiny schedule) -> WatchLearningJob until
// done -> google.longrunning.Operations/GetOperation (unpacks the Any response) -> Generate -> Evaluate.
// Prints one JSON object with what each call returned; exits 1 with {"error": ...} on the first failure.
'use strict';

const crypto = require('crypto');
const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');
const googleProtoFiles = require('google-proto-files');

const PROTOS = path.resolve(__dirname, '..', '..', '..', 'protos');
const GOOGLEAPIS = path.dirname(googleProtoFiles.getProtoPath()); // the folder that holds google/...
const INCLUDE = [PROTOS, GOOGLEAPIS];
const FILES = [
  'ice/localizer/v1/localizer.proto',
  'ice/learner/v1/learner.proto',
  'ice/evaluator/v1/evaluator.proto',
  'google/longrunning/operations.proto',
];
const PNG = Buffer.from([0x89, 0x50, 0x4e, 0x47]);

function args() {
  const out = {};
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i += 2) out[argv[i].replace(/^--/, '')] = argv[i + 1];
  for (const k of ['localizer', 'learner', 'evaluator', 'image']) {
    if (!out[k]) throw new Error(`--${k} is required`);
  }
  return out;
}

// For google.protobuf.Any payloads (the operation's metadata and response): the same .proto files, in protobufjs.
function anyDecoder() {
  const root = new protobuf.Root();
  root.resolvePath = (_origin, target) => {
    for (const dir of INCLUDE) {
      const candidate = path.join(dir, target);
      if (fs.existsSync(candidate)) return candidate;
    }
    return target;
  };
  root.loadSync(FILES, {keepCase: true});
  return (any) => {
    const typeName = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    const type = root.lookupType(typeName);
    return {type: typeName, value: type.toObject(type.decode(any.value), {enums: String, longs: String})};
  };
}

function deadline(seconds) {
  return new Date(Date.now() + seconds * 1000);
}

function unary(client, method, request, seconds = 300) {
  return new Promise((resolve, reject) => {
    client[method](request, {deadline: deadline(seconds)}, (err, response) => {
      if (err) reject(new Error(`${method}: ${grpc.status[err.code]} ${err.details}`));
      else resolve(response);
    });
  });
}

function stream(client, method, request, seconds = 600) {
  return new Promise((resolve, reject) => {
    const items = [];
    const call = client[method](request, {deadline: deadline(seconds)});
    call.on('data', (item) => items.push(item));
    call.on('error', (err) => reject(new Error(`${method}: ${grpc.status[err.code]} ${err.details}`)));
    call.on('end', () => resolve(items));
  });
}

async function main() {
  const a = args();
  const definition = protoLoader.loadSync(FILES, {
    includeDirs: INCLUDE, keepCase: true, longs: String, enums: String, defaults: false, oneofs: true,
  });
  const api = grpc.loadPackageDefinition(definition);
  const creds = grpc.credentials.createInsecure();
  const localizer = new api.ice.localizer.v1.LocalizerService(a.localizer, creds);
  const learner = new api.ice.learner.v1.LearnerService(a.learner, creds);
  const operations = new api.google.longrunning.Operations(a.learner, creds);
  const evaluator = new api.ice.evaluator.v1.EvaluatorService(a.evaluator, creds);
  const unpack = anyDecoder();
  const image = fs.readFileSync(a.image);
  const out = {};

  // 1. localizer: a real photo -> concepts with nouns and PNG masks
  const loc = await unary(localizer, 'Localize', {
    image,
    // the tiny bundle's random attention needs a small merge threshold to give the noun segments
    options: {max_concepts: 1, max_rounds: 2, merge_threshold: 0.0008, min_area_fraction: 0},
  });
  out.localize = {
    width: loc.width, height: loc.height, stop_reason: loc.stop_reason,
    concepts: loc.concepts.map((c) => ({
      concept_id: c.concept_id, noun: c.noun, area_fraction: c.area_fraction, mask_is_png: c.mask.subarray(0, 4).equals(PNG),
    })),
    timings: (loc.timings || []).map((t) => t.stage),
  };
  if (!loc.concepts.length) throw new Error('Localize found no concept');
  const concept = loc.concepts[0];

  // 2. learner: a job with a tiny schedule, as a google.longrunning.Operation; its metadata is an Any
  const op = await unary(learner, 'CreateLearningJob', {
    image,
    concepts: [{noun: concept.noun, mask: concept.mask, concept_id: concept.concept_id}],
    schedule: {phase1_steps: 2, phase2_steps: 2, refinement_steps: 1, num_class_images: 2, checkpoint_every: 0},
    request_id: crypto.randomUUID(),
    seed: '0',
  });
  const created = unpack(op.metadata);
  out.create = {name: op.name, done: Boolean(op.done), metadata_type: created.type, state: created.value.state};

  // 3. watch it to the end (server streaming)
  const updates = await stream(learner, 'WatchLearningJob', {name: op.name});
  const last = updates[updates.length - 1];
  out.watch = {
    updates: updates.length,
    states: [...new Set(updates.map((u) => u.metadata.state))],
    phases: [...new Set(updates.map((u) => u.metadata.phase).filter(Boolean))],
    last: {done: Boolean(last.done), result: last.result, step: Number(last.metadata.step), total_steps: Number(last.metadata.total_steps),
      tokens: last.response ? last.response.tokens.map((t) => t.token) : []},
  };

  // 4. the standard Operations service, and the Any response unpacked by its type URL
  const done = await unary(operations, 'GetOperation', {name: op.name});
  const response = unpack(done.response);
  out.operation = {done: Boolean(done.done), result: done.result, response_type: response.type,
    artifacts: response.value.artifacts.map((f) => f.name)};

  // 5. images from the learned tokens (server streaming)
  const generated = await stream(learner, 'Generate', {
    name: op.name, kind: 'PROMPT_KIND_OBJECT_LEVEL', num_images: 1, num_inference_steps: 2, seed: '0',
  });
  out.generate = generated.map((g) => ({prompt: g.prompt, concept_id: g.concept_id, is_png: g.image.subarray(0, 4).equals(PNG)}));

  // 6. evaluator: the generated images against the concept's region of the photo
  const scores = await unary(evaluator, 'Evaluate', {
    source_image: image,
    concepts: [{concept_id: concept.concept_id, mask: concept.mask, images: generated.map((g) => g.image)}],
  });
  out.evaluate = scores.scores.map((s) => ({encoder: s.encoder, sim_i: s.sim_i, acc1: s.acc1,
    concepts: (s.concepts || []).map((c) => c.concept_id)}));

  for (const c of [localizer, learner, operations, evaluator]) c.close();
  process.stdout.write(JSON.stringify(out) + '\n');
}

main().catch((err) => {
  process.stdout.write(JSON.stringify({error: String(err && err.message || err)}) + '\n');
  process.exit(1);
});
