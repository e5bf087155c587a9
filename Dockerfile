# syntax=docker/dockerfile:1
# relayq: build the TypeScript and the native SQLite binding in one stage, run as `node` in a
# slim one. Data lives in /app/data (the SQLite file) and /app/emails (local deliveries and
# failed-mail exports); mount both.

FROM node:26-trixie-slim AS build
WORKDIR /app
# better-sqlite3 compiles from source when no prebuilt binary matches the platform.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 make g++ \
 && rm -rf /var/lib/apt/lists/*
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json ./
COPY src ./src
COPY migrations ./migrations
# The migrations are compiled into dist/ with the rest; devDependencies go after the build.
RUN npm run build && npm prune --omit=dev

FROM node:26-trixie-slim
WORKDIR /app
RUN mkdir -p /app/data /app/emails && chown node:node /app/data /app/emails
COPY --from=build --chown=root:root /app/package.json ./package.json
COPY --from=build --chown=root:root /app/node_modules ./node_modules
COPY --from=build --chown=root:root /app/dist ./dist
COPY --chown=root:root config.example.json ./config.example.json

ENV NODE_ENV=production \
    SMTP_HOST=0.0.0.0 \
    SMTP_PORT=25 \
    HEALTH_CHECK_HOST=0.0.0.0 \
    HEALTH_CHECK_PORT=8025
# Port 25 is below 1024. Docker (20.10 and later) and Podman start containers with
# net.ipv4.ip_unprivileged_port_start=0, so `node` may bind it; docker-compose.yml sets it
# explicitly. Elsewhere (host networking, some Kubernetes runtimes) set that sysctl or use
# SMTP_PORT=2525. A file capability on the node binary would also work, but it makes node
# ignore NODE_OPTIONS and NODE_EXTRA_CA_CERTS (needed for an upstream with a private CA).
EXPOSE 25 8025
VOLUME ["/app/data", "/app/emails"]
USER node

# The check runs inside the container, so it comes from loopback and needs no admin token.
# 200 for ok and degraded, 503 for error; no curl in the image, node's fetch does it.
HEALTHCHECK --interval=30s --timeout=15s --start-period=20s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:'+(process.env.HEALTH_CHECK_PORT||8025)+'/health').then(async r=>{console.log(r.status,await r.text());process.exit(r.ok?0:1)},e=>{console.log(e.message);process.exit(1)})"]

# Not `npm start`: its prestart builds, which needs the devDependencies pruned above.
# relayq handles SIGTERM itself (drain, release claims, checkpoint), so it can be PID 1; only a
# signal in Node's first ~0.1 s, before it listens, is lost then (`docker run --init` avoids that).
CMD ["node", "dist/src/cli/index.js", "serve"]
