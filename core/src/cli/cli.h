// The graft command line: one function per command, sharing option parsing and error handling.
#pragma once

#include <graft/error.h>

#include <string>
#include <vector>

namespace graft::cli {

/// A mistake in how a command was called: printed with the command's usage, exit code 2.
class UsageError : public Error {
 public:
  using Error::Error;
};

using Args = std::vector<std::string>;

int run_generate(const Args& args);
int run_inspect(const Args& args);
int run_forward(const Args& args);
int run_methods(const Args& args);
int run_new_plugin(const Args& args);
int run_merge(const Args& args);
int run_export_adapter(const Args& args);
int run_combine(const Args& args);
int run_run(const Args& args);
int run_validate(const Args& args);
int run_eval(const Args& args);
int run_sweep(const Args& args);
int run_report(const Args& args);
int run_ls(const Args& args);
int run_classify(const Args& args);
int run_cp(const Args& args);

/// Parses "1,5,9" into integers; `what` names the option in errors.
std::vector<std::int64_t> parse_int_list(const std::string& text, const std::string& what);

}  // namespace graft::cli
