// The trial store: a SQLite file that every process running a sweep's trials shares.
#include <graft/io/file.h>
#include <graft/io/json.h>
#include <graft/sweep.h>
#include <signal.h>
#include <sqlite3.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>

#include "sweep/internal.h"
#include "util/file.h"

namespace graft {
namespace fs = std::filesystem;
using nlohmann::json;

namespace sweep_detail {

std::optional<json> read_summary(const fs::path& dir) {
  const auto file = dir / "summary.json";
  if (!fs::exists(file)) return std::nullopt;
  return io::read_json_file(file);
}

std::optional<double> metric_of(const json& summary, const std::string& metric) {
  const auto after = summary.find("eval_after");
  if (after == summary.end() || !after->contains(metric) || !(*after)[metric].is_number())
    return std::nullopt;
  return (*after)[metric].get<double>();
}

}  // namespace sweep_detail

namespace {

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// This machine's name, asked once (claims compare it with every row's owner).
const std::string& this_host() {
  static const std::string host = [] {
    char name[256] = {0};
    gethostname(name, sizeof name - 1);
    return std::string(name);
  }();
  return host;
}

bool same_host(const std::string& owner) {
  return owner.substr(0, owner.rfind(':')) == this_host();
}

// Whether `owner` ("host:pid") is a live process. An owner on another host is taken to be alive:
// only that host can tell.
bool owner_alive(const std::string& owner) {
  const auto colon = owner.rfind(':');
  if (colon == std::string::npos) return false;
  if (!same_host(owner)) return true;
  const auto pid = static_cast<pid_t>(std::stol(owner.substr(colon + 1)));
  return pid > 0 && (kill(pid, 0) == 0 || errno == EPERM);
}

}  // namespace

std::string this_owner() { return this_host() + ":" + std::to_string(getpid()); }

struct TrialStore::Db {
  sqlite3* db = nullptr;
  std::string file;

  void check(int rc, const char* what) const {
    if (rc == SQLITE_OK || rc == SQLITE_DONE || rc == SQLITE_ROW) return;
    const std::string msg = std::string(what) + ": " + sqlite3_errmsg(db);
    // A damaged or foreign file is the input's fault; a full disk, an I/O error or a lock held
    // too long is the machine's.
    const int primary = rc & 0xff;
    if (primary == SQLITE_CORRUPT || primary == SQLITE_NOTADB) throw FileError(file, msg);
    throw SystemError(file, msg);
  }
  void exec(const char* sql) const { check(sqlite3_exec(db, sql, nullptr, nullptr, nullptr), sql); }

  // A prepared statement that finalizes itself.
  struct Stmt {
    const Db& owner;
    sqlite3_stmt* s = nullptr;
    Stmt(const Db& d, const char* sql) : owner(d) {
      d.check(sqlite3_prepare_v2(d.db, sql, -1, &s, nullptr), sql);
    }
    ~Stmt() { sqlite3_finalize(s); }
    Stmt& text(int i, const std::string& v) {
      sqlite3_bind_text(s, i, v.c_str(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
      return *this;
    }
    Stmt& integer(int i, std::int64_t v) {
      sqlite3_bind_int64(s, i, v);
      return *this;
    }
    Stmt& real(int i, std::optional<double> v) {
      if (v)
        sqlite3_bind_double(s, i, *v);
      else
        sqlite3_bind_null(s, i);
      return *this;
    }
    bool step() {
      const int rc = sqlite3_step(s);
      owner.check(rc, "step");
      return rc == SQLITE_ROW;
    }
    std::string column_text(int i) const {
      const auto* t = sqlite3_column_text(s, i);
      return t ? reinterpret_cast<const char*>(t) : "";
    }
  };

  // BEGIN IMMEDIATE takes the write lock at once, so two processes never both read a trial as
  // pending and then both claim it. Rolled back unless committed.
  struct Transaction {
    const Db& d;
    bool done = false;
    explicit Transaction(const Db& db) : d(db) { d.exec("BEGIN IMMEDIATE"); }
    void commit() {
      d.exec("COMMIT");
      done = true;
    }
    ~Transaction() {
      if (!done) sqlite3_exec(d.db, "ROLLBACK", nullptr, nullptr, nullptr);
    }
  };
};

TrialStore::TrialStore(const fs::path& file) : db_(new Db) {
  db_->file = file.string();
  std::error_code ec;
  if (!file.parent_path().empty()) fs::create_directories(file.parent_path(), ec);
  if (ec) {
    delete db_;
    io::fail_on(file, "cannot create the trial store's folder", ec);
  }
  if (sqlite3_open_v2(db_->file.c_str(), &db_->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE,
                      nullptr) != SQLITE_OK) {
    const std::string msg = db_->db ? sqlite3_errmsg(db_->db) : "out of memory";
    sqlite3_close(db_->db);
    delete db_;
    throw FileError(file.string(), "cannot open the trial store: " + msg);
  }
  sqlite3_busy_timeout(db_->db, 120000);  // other sweep processes hold the lock for milliseconds
  try {
    db_->exec(R"(CREATE TABLE IF NOT EXISTS trials(
      id TEXT PRIMARY KEY, idx INTEGER, setting TEXT, label TEXT, seed INTEGER,
      overrides TEXT, recipe TEXT, status TEXT NOT NULL DEFAULT 'pending', owner TEXT,
      attempts INTEGER NOT NULL DEFAULT 0, started REAL, finished REAL, wall_seconds REAL,
      metric REAL, summary TEXT, exit_code INTEGER, error TEXT))");
  } catch (...) {
    sqlite3_close(db_->db);
    delete db_;
    throw;
  }
}

TrialStore::~TrialStore() {
  sqlite3_close(db_->db);
  delete db_;
}

void TrialStore::sync(const Sweep& sweep) {
  Db::Transaction tx(*db_);
  // Trials the sweep no longer has (an edited sweep file) leave the store; their run folders
  // stay, and come back as done if the setting returns.
  db_->exec("CREATE TEMP TABLE IF NOT EXISTS current(id TEXT PRIMARY KEY)");
  db_->exec("DELETE FROM current");
  for (const auto& t : sweep.trials)
    Db::Stmt(*db_, "INSERT OR IGNORE INTO current(id) VALUES(?)").text(1, t.id).step();
  db_->exec("DELETE FROM trials WHERE id NOT IN (SELECT id FROM current)");
  for (const auto& t : sweep.trials) {
    Db::Stmt(*db_,
             "INSERT OR IGNORE INTO trials(id, idx, setting, label, seed, overrides) "
             "VALUES(?, ?, ?, ?, ?, ?)")
        .text(1, t.id)
        .integer(2, static_cast<std::int64_t>(t.index))
        .text(3, t.setting)
        .text(4, t.label)
        .integer(5, static_cast<std::int64_t>(t.seed))
        .text(6, json(t.overrides).dump())
        .step();
    Db::Stmt(*db_, "UPDATE trials SET idx = ? WHERE id = ?")
        .integer(1, static_cast<std::int64_t>(t.index))
        .text(2, t.id)
        .step();
    if (fs::exists(t.dir / "recipe.yaml"))
      Db::Stmt(*db_, "UPDATE trials SET recipe = ? WHERE id = ?")
          .text(1, io::read_text_file(t.dir / "recipe.yaml"))
          .text(2, t.id)
          .step();
    if (const auto summary = sweep_detail::read_summary(t.dir)) {
      Db::Stmt(*db_,
               "UPDATE trials SET status = 'done', summary = ?, metric = ?, wall_seconds = ?, "
               "error = NULL WHERE id = ?")
          .text(1, summary->dump())
          .real(2, sweep_detail::metric_of(*summary, sweep.metric))
          .real(3, summary->value("wall_seconds", 0.0))
          .text(4, t.id)
          .step();
    } else {
      Db::Stmt(*db_,
               "UPDATE trials SET status = 'pending', summary = NULL, metric = NULL "
               "WHERE id = ? AND status = 'done'")
          .text(1, t.id)
          .step();
    }
  }
  tx.commit();
}

std::optional<std::string> TrialStore::claim(const std::string& owner, bool retry_failed,
                                             const std::optional<std::string>& only,
                                             const std::set<std::string>& skip) {
  Db::Transaction tx(*db_);
  std::optional<std::string> chosen;
  {
    Db::Stmt q(*db_, "SELECT id, status, owner FROM trials ORDER BY idx");
    while (!chosen && q.step()) {
      const auto id = q.column_text(0), status = q.column_text(1), by = q.column_text(2);
      if ((only && id != *only) || skip.count(id)) continue;
      // A named trial (a Slurm array task: the scheduler runs one instance of it at a time) is
      // taken unless done or alive on this host; a requeued task on another node takes it over.
      const bool free =
          only ? status != "done" && !(status == "running" && same_host(by) && owner_alive(by))
               : status == "pending" || (status == "failed" && retry_failed) ||
                     (status == "running" && !owner_alive(by));
      if (free) chosen = id;
    }
  }
  if (chosen) {
    Db::Stmt(*db_,
             "UPDATE trials SET status = 'running', owner = ?, attempts = attempts + 1, "
             "started = ?, finished = NULL, error = NULL WHERE id = ?")
        .text(1, owner)
        .real(2, now_seconds())
        .text(3, *chosen)
        .step();
  }
  tx.commit();
  return chosen;
}

void TrialStore::finish(const std::string& id, bool ok, const json& summary,
                        std::optional<double> metric, double wall, int exit_code,
                        const std::string& error) {
  Db::Transaction tx(*db_);
  Db::Stmt(*db_,
           "UPDATE trials SET status = ?, finished = ?, wall_seconds = ?, summary = ?, "
           "metric = ?, exit_code = ?, error = ? WHERE id = ?")
      .text(1, ok ? "done" : "failed")
      .real(2, now_seconds())
      .real(3, wall)
      .text(4, summary.dump())
      .real(5, metric)
      .integer(6, exit_code)
      .text(7, error)
      .text(8, id)
      .step();
  tx.commit();
}

std::vector<TrialStore::Row> TrialStore::rows() const {
  std::vector<Row> out;
  Db::Stmt q(*db_, "SELECT id, status, owner, error, attempts, metric FROM trials ORDER BY idx");
  while (q.step()) {
    Row r{q.column_text(0),
          q.column_text(1),
          q.column_text(2),
          q.column_text(3),
          sqlite3_column_int64(q.s, 4),
          std::nullopt};
    if (sqlite3_column_type(q.s, 5) != SQLITE_NULL) r.metric = sqlite3_column_double(q.s, 5);
    out.push_back(std::move(r));
  }
  return out;
}

}  // namespace graft
