#!/usr/bin/env node
// Get a token from credbroker with Node's @grpc/grpc-js: a plain unix:// channel, the service loaded from
// broker.proto (npm ci --prefix examples: @grpc/grpc-js, @grpc/proto-loader). Prints the access token.
//
// usage: node_grpc.js SCOPE...   (CREDBROKER_SOCKET; CREDBROKER_PROTO: where credbroker/v1/broker.proto is,
//                                 by default the checkout's proto/ when run from one, else the package's)
const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const checkout = path.join(__dirname, '..', 'proto');
const protoRoot = process.env.CREDBROKER_PROTO
  || (fs.existsSync(path.join(checkout, 'credbroker/v1/broker.proto')) ? checkout : '/usr/share/credbroker/proto');
const socket = process.env.CREDBROKER_SOCKET || '/run/credbroker/credbroker.sock';
const definition = protoLoader.loadSync('credbroker/v1/broker.proto', { includeDirs: [protoRoot], keepCase: true });
const { TokenBroker } = grpc.loadPackageDefinition(definition).credbroker.v1;

const broker = new TokenBroker(`unix://${socket}`, grpc.credentials.createInsecure());
broker.getToken({ scopes: process.argv.slice(2) }, { deadline: Date.now() + 10000 }, (err, token) => {
  if (err) {
    console.error(`credbroker: ${grpc.status[err.code]}: ${err.details}`);
    process.exit(1);
  }
  console.log(token.access_token);
  broker.close();
});
