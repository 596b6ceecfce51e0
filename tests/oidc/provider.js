// A real OpenID Provider (panva's oidc-provider) on 127.0.0.1 for credbroker's interop tests.
//
// usage: node provider.js '<json>'   with json = {
//   "scopes": ["scim:read", ...],
//   "clients": [{ "client_id": "...", "auth": "client_secret_basic" | "client_secret_post" | "private_key_jwt",
//                 "client_secret": "...", "alg": "ES256" | "RS256" | "PS256", "scope": "a b" }],
//   "resources": { "https://api.example.com": { "scope": "a b" } },
//   "issuer_host": "127.0.0.1" (the host named in the issuer; it always listens on 127.0.0.1),
//   "dpop": true (DPoP on, a server nonce required in every proof; clients with "dpop": true get only
//                 DPoP-bound tokens) }
// For private_key_jwt clients a key pair is generated here; the first line printed is JSON:
//   { "issuer": "http://127.0.0.1:PORT", "keys": { "<client_id>": { "pem": "...", "kid": "..." } } }
// Then the provider serves until killed.
import { createServer } from 'node:http';
import { generateKeyPairSync, randomBytes, randomUUID } from 'node:crypto';
import Provider, { errors } from 'oidc-provider';

const input = JSON.parse(process.argv[2] ?? '{}');
const keys = {};
const clients = (input.clients ?? []).map((c) => {
  const client = {
    client_id: c.client_id,
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: c.auth,
    scope: c.scope,
  };
  if (c.dpop) client.dpop_bound_access_tokens = true;
  if (c.auth === 'private_key_jwt') {
    const kid = randomUUID();
    const pair = c.alg === 'RS256' || c.alg === 'PS256'
      ? generateKeyPairSync('rsa', { modulusLength: 2048 })
      : generateKeyPairSync('ec', { namedCurve: 'P-256' });
    keys[c.client_id] = { pem: pair.privateKey.export({ format: 'pem', type: 'pkcs8' }), kid };
    client.jwks = { keys: [{ ...pair.publicKey.export({ format: 'jwk' }), kid, alg: c.alg, use: 'sig' }] };
    client.token_endpoint_auth_signing_alg = c.alg;
  } else {
    client.client_secret = c.client_secret;
  }
  return client;
});
const resources = input.resources ?? {};

const server = createServer();
server.listen(0, '127.0.0.1', () => {
  const issuer = `http://${input.issuer_host ?? '127.0.0.1'}:${server.address().port}`;
  const provider = new Provider(issuer, {
    clients,
    scopes: input.scopes ?? [],
    features: {
      devInteractions: { enabled: false },
      ...(input.dpop
        ? { dPoP: { enabled: true, nonceSecret: randomBytes(32), requireNonce: () => true } }
        : {}),
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => undefined,
        useGrantedResource: () => false,
        getResourceServerInfo: (ctx, resource) => {
          const known = resources[resource];
          if (!known) throw new errors.InvalidTarget();
          return { scope: known.scope, audience: resource, accessTokenFormat: 'jwt' };
        },
      },
    },
  });
  server.on('request', provider.callback());
  process.stdout.write(`${JSON.stringify({ issuer, keys })}\n`);
});
