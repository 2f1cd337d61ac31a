// A real local AT Protocol network for phash_trio's e2e suite (npm @atproto/dev-env).
//
// Starts PLC, PDS, AppView and Ozone (TestNetwork) on Postgres (DB_POSTGRES_URL) and Redis
// (REDIS_HOST), creates the accounts the suite needs and prints ONE JSON line on stdout:
// endpoints, the labeler DID and credentials. Then it reads commands, one per line, on stdin
// and answers each with one JSON line:
//   {"cmd":"sync"}                     process every pending event (PDS -> AppView, Ozone)
//   {"cmd":"close"}                    stop the network and exit 0
// stdin closing stops it too. Everything else goes to stderr.
import { TestNetwork } from '@atproto/dev-env'
import readline from 'node:readline'

const log = (...args) => console.error('[network]', ...args)

const schema = process.env.DB_POSTGRES_SCHEMA || 'phashtrio'
const started = Date.now()
const network = await TestNetwork.create({
  dbPostgresSchema: schema,
  pds: { inviteRequired: false },
  // Ozone re-reads the labeler's service record (reasonTypes) after this many ms.
  ozone: { serviceRecordCacheTTL: 500 },
})
log(`TestNetwork up in ${Date.now() - started} ms`)

const agent = network.pds.getAgent()

async function account(handle, password) {
  const res = await agent.com.atproto.server.createAccount({
    handle,
    email: `${handle.split('.')[0]}@phash-e2e.test`,
    password,
  })
  return { did: res.data.did, handle, password }
}

async function appPassword(acct) {
  const a = network.pds.getAgent()
  await a.login({ identifier: acct.handle, password: acct.password })
  const res = await a.com.atproto.server.createAppPassword({ name: 'phash-trio' })
  return res.data.password
}

const automod = await account('automod.test', 'automod-main-pass')
const triage = await account('triage-bot.test', 'triage-main-pass')
await network.ozone.addModeratorDid(automod.did)
await network.ozone.addTriageDid(triage.did)
const authors = []
for (const name of ['alice', 'bob', 'carol']) {
  authors.push(await account(`${name}.test`, `${name}-pass`))
}
const automodApp = await appPassword(automod)
const triageApp = await appPassword(triage)
await network.processAll()

const info = {
  plc: network.plc.url,
  pds: network.pds.url,
  appview: network.bsky.url,
  ozone: network.ozone.url,
  labelerDid: network.ozone.ctx.cfg.service.did,
  labeler: { handle: 'mod-authority.test', password: 'hunter2' },
  automod: { ...automod, appPassword: automodApp },
  triage: { ...triage, appPassword: triageApp },
  authors,
  startupMs: Date.now() - started,
}
process.stdout.write(JSON.stringify(info) + '\n')

let closing = false
async function shutdown(code) {
  if (closing) return
  closing = true
  setTimeout(() => process.exit(code), 20000).unref() // never outlive the suite for long
  try {
    await network.close()
  } catch (err) {
    log('close failed:', err?.message)
  }
  process.exit(code)
}
process.on('SIGTERM', () => shutdown(0))
process.on('SIGINT', () => shutdown(0))

const rl = readline.createInterface({ input: process.stdin })
for await (const line of rl) {
  let cmd
  try {
    cmd = JSON.parse(line).cmd
  } catch {
    process.stdout.write(JSON.stringify({ error: 'not JSON' }) + '\n')
    continue
  }
  try {
    if (cmd === 'sync') {
      await network.processAll()
      process.stdout.write(JSON.stringify({ ok: true }) + '\n')
    } else if (cmd === 'close') {
      process.stdout.write(JSON.stringify({ ok: true }) + '\n')
      break
    } else {
      process.stdout.write(JSON.stringify({ error: `unknown command ${cmd}` }) + '\n')
    }
  } catch (err) {
    process.stdout.write(JSON.stringify({ error: String(err?.message ?? err) }) + '\n')
  }
}
await shutdown(0)
