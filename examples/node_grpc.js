#!/usr/bin/env node
// Get a token from credbroker with Node's @grpc/grpc-js: a plain unix:// channel, the service loaded from
// broker.proto (npm install @grpc/grpc-js @grpc/proto-loader). Prints the access token.
//
// usage: node_grpc.js SCOPE...   (CREDBROKER_SOCKET, CREDBROKER_PROTO: where credbroker/v1/broker.proto is)
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const protoRoot = process.env.CREDBROKER_PROTO || '/usr/share/credbroker/proto';
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
