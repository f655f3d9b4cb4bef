#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>
#include <torch/torch.h>

#include <string>

int main(int argc, char** argv) {
  torch::set_num_threads(1);  // ctest runs the cases in parallel; keep each on one core
  doctest::Context context(argc, argv);
  return context.run();
}

// ctest runs each case by its name (doctest_discover_tests), and CMake reads ';' as a list
// separator: a name holding one becomes two ctest tests whose filters match no case, and which
// pass without running anything.
TEST_CASE("every test case's name survives ctest's list of tests") {
  for (const auto& tc : doctest::detail::getRegisteredTests())
    CHECK_MESSAGE(std::string(tc.m_name).find(';') == std::string::npos,
                  "a ';' in the name of \"" << tc.m_name << "\" makes ctest run nothing for it");
}
