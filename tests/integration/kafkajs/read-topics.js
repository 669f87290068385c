// Reads every message of the given topics with kafkajs, the Kafka client the grid system's
// other services consume with (its alert service pins 2.2.4), and prints each one as a JSON
// line: {"topic","partition","offset","key","value","headers"} (key, value and header values
// base64). kafkajs decodes only uncompressed and gzip record batches: on any other it
// raises KafkaJSNotImplemented, which ends this script with exit code 3 and that error's
// name and message on stderr.
//
//   node read-topics.js BROKER TIMEOUT_S TOPIC [TOPIC...]
'use strict';

const { Kafka, logLevel } = require('kafkajs');

const [broker, timeoutS, ...topics] = process.argv.slice(2);
if (!broker || !timeoutS || topics.length === 0) {
  process.stderr.write('usage: node read-topics.js BROKER TIMEOUT_S TOPIC [TOPIC...]\n');
  process.exit(2);
}

const toStderr = () => ({ namespace, log }) =>
  process.stderr.write(`kafkajs ${namespace}: ${log.message}\n`);
const kafka = new Kafka({
  clientId: 'segs-kafkajs-check', brokers: [broker], logLevel: logLevel.WARN,
  logCreator: toStderr, retry: { retries: 3 },
});
const b64 = (buf) => (buf == null ? null : Buffer.from(buf).toString('base64'));

function fail(code, error) {
  process.stderr.write(`${error.name}: ${error.message}\n`);
  process.exit(code);
}

async function main() {
  const admin = kafka.admin();
  await admin.connect();
  const todo = new Map(); // "topic/partition" -> last offset still to read
  for (const topic of topics) {
    for (const { partition, low, high } of await admin.fetchTopicOffsets(topic)) {
      if (BigInt(high) > BigInt(low)) todo.set(`${topic}/${partition}`, BigInt(high) - 1n);
    }
  }
  await admin.disconnect();
  if (todo.size === 0) process.exit(0);

  const consumer = kafka.consumer({ groupId: `segs-kafkajs-check-${process.pid}-${Date.now()}` });
  consumer.on(consumer.events.CRASH, ({ payload }) => fail(3, payload.error));
  setTimeout(() => fail(4, { name: 'Timeout', message: `${[...todo.keys()]} not read to the end` }),
    Number(timeoutS) * 1000).unref();
  await consumer.connect();
  await consumer.subscribe({ topics, fromBeginning: true });
  await consumer.run({
    autoCommit: false,
    eachMessage: async ({ topic, partition, message }) => {
      const headers = {};
      for (const [k, v] of Object.entries(message.headers || {})) headers[k] = b64(v);
      process.stdout.write(JSON.stringify({
        topic, partition, offset: Number(message.offset), key: b64(message.key),
        value: b64(message.value), headers,
      }) + '\n');
      const id = `${topic}/${partition}`;
      if (todo.has(id) && BigInt(message.offset) >= todo.get(id)) todo.delete(id);
      if (todo.size === 0) {
        setImmediate(async () => {
          await consumer.disconnect();
          process.exit(0);
        });
      }
    },
  });
}

main().catch((error) => fail(error.name === 'KafkaJSNotImplemented' ? 3 : 1, error));
