// Serves the API app on a TCP port with @hono/node-server. close() stops listening, drops idle
// keep-alive connections at once and cuts the rest after a short grace, so shutdown is bounded.
import type { Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { serve } from '@hono/node-server';
import type { Hono } from 'hono';
import type { ApiEnv } from './context.js';

export interface ApiServer {
  port: number;
  close(): Promise<void>;
}

const CLOSE_GRACE_MS = 2000;

export function startApiServer(app: Hono<ApiEnv>, host: string, port: number): Promise<ApiServer> {
  return new Promise((resolve, reject) => {
    const server = serve({ fetch: app.fetch, hostname: host, port }, (info: AddressInfo) => {
      server.off('error', reject);
      let closing: Promise<void> | undefined;
      resolve({
        port: info.port,
        close() {
          closing ??= new Promise<void>((done) => {
            const http = server as Server;
            const force = setTimeout(() => http.closeAllConnections(), CLOSE_GRACE_MS);
            force.unref();
            http.close(() => {
              clearTimeout(force);
              done();
            });
            http.closeIdleConnections();
          });
          return closing;
        },
      });
    });
    server.once('error', reject);
  });
}
