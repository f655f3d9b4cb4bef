// Errors that graft reports to people.
#pragma once

#include <stdexcept>
#include <string>

namespace graft {

/// Every error graft raises for a bad file, value or usage. The message is one line, already
/// carrying its context ("model.gguf: tensor 'blk.0.attn_q.weight': data runs past the end of
/// the file"), ready to print as it is. The command line exits 2 for it: the input is wrong.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A failure of the machine or its environment, not of the input: a write that fails (a full
/// disk), a process that cannot start. The command line exits 1 for it: the same command may
/// succeed elsewhere or later.
class SystemError : public Error {
 public:
  using Error::Error;
  SystemError(const std::string& path, const std::string& what) : Error(path + ": " + what) {}
};

/// An error about the contents of a file: prints as "<path>: <what>".
class FileError : public Error {
 public:
  FileError(const std::string& path, const std::string& what) : Error(path + ": " + what) {}
};

}  // namespace graft
