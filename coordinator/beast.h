// Private to coordinator/*.cc: the Boost.Beast / Asio headers we use, included in one place.
//
// GCC 12 with -O3 and the sanitizers reports -Wmaybe-uninitialized inside Beast's parser
// (boost::optional in basic_parser::content_length_unchecked): a false positive in a system
// header that survives inlining, so it is silenced for these headers only, not for our code.
#pragma once

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <boost/asio/connect.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#pragma GCC diagnostic pop
